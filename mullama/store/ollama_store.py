"""Reuse of the models an existing Ollama installation already holds.

Ollama's store has the same layout as Mullama's, so a model Ollama has
pulled is imported by linking (else reflinking, else copying) its blobs into
Mullama's store after checking their sha256, with no download. Ollama's
store is only ever read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mullama import config
from mullama.errors import BadRequestError, InvalidModelFileError, MullamaError
from mullama.store.names import ModelName
from mullama.store.blobs import Manifest, ModelEntry, Store


def ollama_root() -> Path | None:
    """Ollama's model directory (``OLLAMA_MODELS``, else ``~/.ollama/models``), if it exists.

    ``OLLAMA_MODELS`` is read alone, not through :func:`config.env`, because
    ``MULLAMA_MODELS`` names Mullama's own store (the README's "Mullama's
    store and Ollama's" says why the two stay apart).
    """
    explicit = config.variable("OLLAMA_MODELS")
    candidates = [Path(explicit).expanduser()] if explicit else [
        Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    for candidate in candidates:
        if (candidate / "manifests").is_dir():
            return candidate
    return None


def find(name: ModelName, root: Path | None = None) -> Manifest | None:
    """Ollama's manifest for ``name``, when Ollama holds the model with every blob."""
    root = root if root is not None else ollama_root()
    if root is None:
        return None
    ollama = Store(root)
    try:
        manifest = ollama.read_manifest(name)
    except (MullamaError, OSError):
        return None
    if all(ollama.has_blob(digest) for digest in manifest.digests()):
        return manifest
    return None


def list_importable(root: Path | None = None) -> list[ModelEntry]:
    """The models of Ollama's store that could be imported (every blob present)."""
    root = root if root is not None else ollama_root()
    if root is None:
        return []
    return [entry for entry in Store(root).list_models() if find(entry.name, root) is not None]


def import_model(name: ModelName, store: Store, progress: Callable[[dict[str, Any]], None],
                 root: Path | None = None) -> bool:
    """Copy ``name`` from Ollama's store into ``store``; False when Ollama does not have it.

    Each blob is verified against its digest before it is admitted, so a
    damaged file in Ollama's store is never imported.
    """
    root = root if root is not None else ollama_root()
    if root is None or root.resolve() == store.root.resolve():
        return False
    manifest = find(name, root)
    if manifest is None:
        return False
    ollama = Store(root)
    for layer in (manifest.config, *manifest.layers):
        try:
            store.add_blob_from_file(ollama.blob_path(layer.digest), layer.digest, sharing="link")
        except InvalidModelFileError:
            return False
        progress({"status": f"pulling {layer.digest[7:19]}", "digest": layer.digest,
                  "total": layer.size, "completed": layer.size})
    # The blobs are now Mullama's own, so a path left in "from" by Ollama means nothing here; a model name
    # there (the parent model) still does.
    imported = Manifest(replace(manifest.config, from_path=None),
                        tuple(replace(layer, from_path=_parent(layer.from_path)) for layer in manifest.layers))
    progress({"status": "verifying sha256 digest"})
    progress({"status": "writing manifest"})
    store.write_manifest(name, imported)
    progress({"status": "success"})
    return True


def _parent(source: str | None) -> str | None:
    """``source`` when it names a parent model rather than a file (Ollama writes both in a layer's "from")."""
    if not source:
        return None
    try:
        ModelName.parse(source)
    except BadRequestError:
        return None
    return source
