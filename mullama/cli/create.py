"""``mullama create``: a Modelfile turned into an ``/api/create`` request, its local files uploaded as blobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mullama.store import modelfile
from mullama.cli.progress import Progress
from mullama.client import Client, file_digest
from mullama.errors import BadRequestError, NotFoundError


@dataclass
class CreatePlan:
    """An ``/api/create`` body, plus the local files to upload as blobs first (digest to path)."""

    request: dict[str, Any]
    uploads: dict[str, Path] = field(default_factory=dict)


def create_request(recipe: modelfile.Modelfile, base_dir: Path, *, in_place: bool = False) -> CreatePlan:
    """Turn a parsed Modelfile into what current Ollama's ``create`` sends.

    ``FROM``, ``ADAPTER`` and ``DRAFT`` paths (absolute, ``~``, or relative to
    the Modelfile's directory) that exist become ``files``/``adapters``/
    ``draft_files`` maps of file name to digest (every ``FROM`` file joins
    ``files``, as a model and its projector); a ``FROM`` that is not a local
    path is a model name, which the daemon pulls when it lacks it.
    With ``in_place``, ``FROM`` must be a GGUF file, sent as its absolute
    path with Mullama's ``in_place`` flag so the daemon references it
    instead of storing a copy.
    """
    plan = CreatePlan({})
    request = plan.request
    source = _expand_path(recipe.from_, base_dir)
    if in_place:
        if not source.is_file():
            raise BadRequestError(f"--in-place needs FROM to name a GGUF file: {recipe.from_}")
        request["from"], request["in_place"] = str(source.resolve()), True
    sources = [] if in_place else [recipe.from_]
    for text in sources + recipe.more_from:
        path = _expand_path(text, base_dir)
        if path.exists():
            request.setdefault("files", {}).update(_digests(path, plan))
        elif "from" in request:
            raise BadRequestError(f"FROM {text}: no such file, and only one FROM may name a model")
        else:
            request["from"] = text
    if recipe.adapters:
        request["adapters"] = {}
        for adapter in recipe.adapters:
            request["adapters"].update(_digests(_expand_path(adapter, base_dir), plan))
    if recipe.draft:
        draft = _expand_path(recipe.draft, base_dir)
        if not draft.exists():
            raise BadRequestError(f"DRAFT must be a local path: {recipe.draft}")
        if draft.resolve() in {_expand_path(text, base_dir).resolve() for text in [recipe.from_, *recipe.more_from]}:
            raise BadRequestError(f"DRAFT must not reference the same local path as FROM: {draft}")
        request["draft_files"] = _digests(draft, plan)
    for key in ("template", "system", "renderer", "parser", "requires"):
        if getattr(recipe, key):
            request[key] = getattr(recipe, key)
    if recipe.parameters:
        request["parameters"] = dict(recipe.parameters)
    if recipe.messages:
        request["messages"] = [{"role": m.role, "content": m.content} for m in recipe.messages]
    if recipe.licenses:
        request["license"] = list(recipe.licenses)
    return plan


def _expand_path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser() if text.startswith("~") else Path(text)
    return (path if path.is_absolute() else base_dir / path).absolute()


def _digests(path: Path, plan: CreatePlan) -> dict[str, str]:
    """Digest ``path`` (a file, or a directory's GGUF files) and note the uploads."""
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    if not files:
        raise NotFoundError(f"no GGUF files found in {path}")
    names = {}
    for file in files:
        digest = file_digest(file.resolve())
        plan.uploads[digest] = file.resolve()
        names[file.name] = digest
    return names


def upload(client: Client, digest: str, path: Path, progress: Progress) -> None:
    """Send ``path`` as the blob ``digest`` unless the daemon already has it."""
    if client.blob_exists(digest):
        return
    progress.status(f"copying file {digest} 0%", key=digest)
    with path.open("rb") as file:
        client.upload_blob(digest, file, path.stat().st_size)
    progress.status(f"copying file {digest} 100%", key=digest)
