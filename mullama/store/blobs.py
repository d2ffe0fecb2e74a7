"""The content-addressed model store, laid out exactly like Ollama's.

``blobs/sha256-<hex>`` holds file contents, named by their hash;
``manifests/<host>/<namespace>/<model>/<tag>`` holds one JSON manifest per
model name, listing the blobs (layers) that make the model. Every write is
atomic (a temporary file in the same directory, fsync, rename), a blob is
admitted only once its bytes hash to its name, and a manifest is written
last, so a crash at any moment leaves either the old or the new state.

A layer may instead *reference* a GGUF file where it lies, without copying
it: the layer keeps its digest and size, and its ``from`` field holds the
file's absolute path. Ollama uses ``from`` for the model a layer came from;
Mullama gives it this meaning only when the value is an absolute path and no
blob with the layer's digest is present.

A :class:`Store` keeps an index of its manifests in memory, so that a
request reads no manifest it has read before: an entry is trusted while a
stat of its file says it is unchanged, and the whole tree is walked again
only to list the models or to find a name the index lacks. Another process
may write the store at any time; what it wrote is seen at the next stat.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from mullama import config
from mullama.errors import BadRequestError, InvalidModelFileError, ModelNotFoundError, NotFoundError
from mullama.filelock import exclusive
from mullama.store import gguf
from mullama.store.names import ModelName, blob_path, canonical_digest, parse_digest
from mullama.store.pypi import sha256_file

if TYPE_CHECKING:
    from mullama.store.records import ModelRecord

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPES = {kind: f"application/vnd.ollama.image.{kind}" for kind in (
    "model", "adapter", "projector", "draft", "template", "system", "params", "messages", "license")}

_CHUNK = 1 << 20
#: How long after a file changed a stat may miss a further change: a change within the same tick of the
#: file system's clock (up to 2 s on some) can leave size and time as they were. Until then the bytes are
#: compared too.
RACY_NS = 3_000_000_000
#: GGUF headers kept per store; a header of a large model takes a few hundred kilobytes.
_HEADER_CACHE = 256
# Linux's FICLONE ioctl: a copy-on-write clone on btrfs, XFS and similar.
_FICLONE = 0x40049409


@dataclass(frozen=True)
class Layer:
    """One blob of a manifest: a model, projector, template, parameters..."""

    media_type: str
    digest: str
    size: int
    #: The manifest's ``from``: an absolute path, of a file referenced in place instead of a blob; else, as
    #: in Ollama, the name of the model the layer was taken from (``details.parent_model``).
    from_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The layer as it appears in manifest JSON."""
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_path:
            data["from"] = self.from_path
        return data

    @classmethod
    def from_json(cls, data: Any) -> Layer:
        """Read one layer object, rejecting anything malformed."""
        if not isinstance(data, dict):
            raise InvalidModelFileError("manifest layer is not an object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        source = data.get("from")
        if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidModelFileError("manifest layer lacks a media type or size")
        if not isinstance(source, str):
            source = None
        try:
            digest = canonical_digest(digest)
        except BadRequestError as exc:
            raise InvalidModelFileError(f"manifest layer: {exc.message}") from None
        return cls(media_type, digest, size, source)


@dataclass(frozen=True)
class Manifest:
    """A model: a config blob plus its layers, in Ollama's schema version 2."""

    config: Layer
    layers: tuple[Layer, ...]

    def to_bytes(self) -> bytes:
        """The JSON bytes Ollama would write for this manifest."""
        return json.dumps({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest JSON, raising :class:`InvalidModelFileError` when it is not one."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise InvalidModelFileError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("schemaVersion") != 2 or not isinstance(obj.get("layers"), list):
            raise InvalidModelFileError("manifest is not a schema version 2 image manifest")
        return cls(Layer.from_json(obj.get("config")), tuple(Layer.from_json(item) for item in obj["layers"]))

    @property
    def size(self) -> int:
        """Total bytes of the config and every layer."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def digests(self) -> set[str]:
        """Every blob digest this manifest needs."""
        return {self.config.digest, *(layer.digest for layer in self.layers)}


@dataclass(frozen=True)
class ModelEntry:
    """One model of :meth:`Store.list_models`."""

    name: ModelName
    #: Hex sha256 of the manifest file, which is what Ollama reports as the model's digest.
    digest: str
    size: int
    #: Modification time of the manifest, seconds since the epoch.
    modified: float


#: What a stat says of a file's version: inode, size, modification time.
FileStamp = tuple[int, int, int]


def file_stamp(stat: os.stat_result) -> FileStamp:
    """The version of a file as a stat tells it (a rename-in gives a new inode; a write, a new size or time)."""
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def is_racy(mtime_ns: int, checked_ns: int) -> bool:
    """Whether a change after ``checked_ns`` could leave a file last modified at ``mtime_ns`` with the same stat.

    See :data:`RACY_NS`; until then a reader must compare the bytes.
    """
    return checked_ns - mtime_ns < RACY_NS


@dataclass(eq=False)
class IndexedManifest:
    """One manifest file as the index knows it: parsed and hashed once per version of the file."""

    name: ModelName
    path: Path
    manifest: Manifest
    entry: ModelEntry
    stamp: FileStamp
    #: When the bytes were last read; a stat is trusted once that is well after the file's last change.
    checked_ns: int
    #: The record built from this version of the manifest (by :mod:`mullama.store.records`), once built.
    record: ModelRecord | None = field(default=None, repr=False)

    @property
    def trusted(self) -> bool:
        """Whether a stat alone tells that the file is unchanged."""
        return not is_racy(self.stamp[2], self.checked_ns)


#: How a blob admitted from a file may share its storage (see :meth:`Store.add_blob_from_file`).
Sharing = Literal["copy", "clone", "link"]


class Store:
    """A model store rooted at ``root`` (default :func:`config.models_dir`).

    One object serves many threads: its index and header cache are guarded
    by a lock. Its own writes are atomic renames; other writers, other
    processes or a hand, are noticed by the stat of what they changed.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else config.models_dir()
        self._lock = threading.Lock()
        #: Manifest file (its path as text) to its entry: every valid manifest, as of the last scan or write.
        self._by_path: dict[str, IndexedManifest] = {}
        #: The same entries by name, and by the case-insensitive key of their name.
        self._by_name: dict[ModelName, IndexedManifest] = {}
        self._by_key: dict[tuple[str, str, str, str], IndexedManifest] = {}
        #: Manifest files that are not valid manifests, by the version that was read.
        self._invalid: dict[str, FileStamp] = {}
        self._headers: OrderedDict[Path, tuple[FileStamp, gguf.GGUFInfo]] = OrderedDict()

    @property
    def partial_dir(self) -> Path:
        """Where downloads in progress live, on the store's file system so they can be renamed in."""
        return self.root / "partial"

    def blob_path(self, digest: str) -> Path:
        """The file of a blob, whether or not it exists yet."""
        return blob_path(self.root, digest)

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is in the store."""
        return self.blob_path(digest).is_file()

    def add_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` as a blob and return its ``sha256:`` digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.blob_path(digest)
        if not target.exists():
            _atomic_write(target, lambda out: out.write(data))
        return digest

    def add_blob_from_file(self, path: Path | str, expected_digest: str | None = None,
                           sharing: Sharing = "copy") -> str:
        """Admit a file as a blob and return its digest.

        With ``expected_digest`` the file must hash to it, else
        :class:`InvalidModelFileError` is raised and nothing is admitted.
        ``sharing`` says whether the blob may share the file's storage when
        the file system allows: ``"clone"`` a reflink (copy-on-write, so
        later edits of the file do not reach the blob), ``"link"`` a hard
        link or else a reflink, only for files no one edits (another
        content-addressed store's blobs). Otherwise the bytes are copied
        and hashed in the same pass.
        """
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"{path}: no such file")
        if expected_digest is not None and self.has_blob(expected_digest):
            return canonical_digest(expected_digest)
        if sharing != "copy":
            digest = "sha256:" + sha256_file(path)
            _check_digest(path, digest, expected_digest)
            if self.has_blob(digest) or _share(path, self.blob_path(digest), hard=sharing == "link"):
                return digest
        return self._copy_in(path, expected_digest)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """The store's one writers' lock: manifests written, models deleted and blobs pruned under it.

        So a blob is never pruned between a writer checking that it exists
        and the manifest that names it being written, whether the writers
        are threads of the daemon or another process (a CLI command).
        """
        return exclusive(self.root / ".writers.lock")

    def _copy_in(self, path: Path, expected_digest: str | None) -> str:
        blobs = self.root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        with _temp_file(blobs) as (out, tmp):
            with open(path, "rb") as source:
                while block := source.read(_CHUNK):
                    hasher.update(block)
                    out.write(block)
            digest = "sha256:" + hasher.hexdigest()
            _check_digest(path, digest, expected_digest)
            _commit(out, tmp, self.blob_path(digest))
        return digest

    def admit_verified(self, path: Path, digest: str) -> None:
        """Rename a downloaded file that already hashed to ``digest`` into the blobs."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        _fsync_dir(target.parent)

    def reference_file(self, path: Path | str, media_type: str = MEDIA_TYPES["model"]) -> Layer:
        """A layer for a GGUF file used where it lies; nothing is copied."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise NotFoundError(f"{path}: no such file")
        return Layer(media_type, "sha256:" + sha256_file(path), path.stat().st_size, str(path))

    def layer_path(self, layer: Layer) -> Path:
        """The file that holds a layer's bytes: its blob, or the file it references.

        A referenced file must still exist with the recorded size; it is not
        re-hashed on every use, which would cost seconds per load.
        """
        blob = self.blob_path(layer.digest)
        if blob.is_file():
            return blob
        if layer.from_path and os.path.isabs(layer.from_path):
            source = Path(layer.from_path)
            if not source.is_file():
                raise NotFoundError(f"model file {source} is gone; recreate the model")
            if source.stat().st_size != layer.size:
                raise InvalidModelFileError(
                    f"model file {source} changed size ({source.stat().st_size} bytes, expected {layer.size});"
                    " recreate the model")
            return source
        raise NotFoundError(f"blob {layer.digest} is missing from the store; pull the model again")

    def write_manifest(self, name: ModelName, manifest: Manifest) -> None:
        """Write (or replace) a model's manifest; every blob it names must already be present."""
        with self.writing():
            for layer in (manifest.config, *manifest.layers):
                self.layer_path(layer)
            existing = self.lookup(name)
            target = existing.path if existing is not None else name.manifest_path(self.root)
            data = manifest.to_bytes()
            checked = time.time_ns()
            _atomic_write(target, lambda out: out.write(data))
        with self._lock, contextlib.suppress(OSError):
            indexed = _parse(existing.name if existing is not None else name, target, data, os.stat(target),
                             checked)
            if indexed is not None:
                self._put(indexed)

    def read_manifest(self, name: ModelName) -> Manifest:
        """The manifest of ``name`` (matched case-insensitively), or :class:`ModelNotFoundError`."""
        found = self.lookup(name)
        if found is None:
            raise ModelNotFoundError(name.display)
        return found.manifest

    def has_model(self, name: ModelName) -> bool:
        """Whether a manifest exists for ``name``."""
        return self.lookup(name) is not None

    def list_models(self) -> list[ModelEntry]:
        """Every readable model in the store, sorted by name."""
        with self._lock:
            self._scan()
            entries = [indexed.entry for indexed in self._by_path.values()]
        return sorted(entries, key=lambda entry: entry.name.display)

    def lookup(self, name: ModelName) -> IndexedManifest | None:
        """The index's entry for ``name`` (matched case-insensitively), checked against its file; None if absent.

        A known, unchanged manifest costs one stat; the tree is walked only
        when the name is unknown or its file changed.
        """
        with self._lock:
            found = self._by_name.get(name) or self._by_key.get(name.key)
            if found is not None and self._current(found):
                return found
            self._scan()
            return self._by_name.get(name) or self._by_key.get(name.key)

    def gguf_info(self, path: Path) -> gguf.GGUFInfo:
        """The header of the GGUF at ``path``, read once per version of the file (see :func:`gguf.read_gguf`)."""
        try:
            stamp = file_stamp(os.stat(path))
        except OSError:
            return gguf.read_gguf(path)  # raises the validator's error for a missing file
        with self._lock:
            cached = self._headers.get(path)
            if cached is not None and cached[0] == stamp:
                self._headers.move_to_end(path)
                return cached[1]
        info = gguf.read_gguf(path)
        with self._lock:
            self._headers[path] = (stamp, info)
            self._headers.move_to_end(path)
            while len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return info

    def copy(self, src: ModelName, dst: ModelName) -> None:
        """Give the model ``src`` a second name; blobs are shared, not copied."""
        self.write_manifest(dst, self.read_manifest(src))

    def delete(self, name: ModelName) -> None:
        """Remove a model, and the blobs no other manifest uses."""
        with self.writing():
            found = self.lookup(name)
            if found is None:
                raise ModelNotFoundError(name.display)
            with contextlib.suppress(FileNotFoundError):
                found.path.unlink()
            _prune_empty_dirs(found.path.parent, self.root / "manifests")
            with self._lock:
                self._scan()
                in_use = set().union(*(indexed.manifest.digests() for indexed in self._by_path.values()))
            for digest in found.manifest.digests() - in_use:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()

    # --- the index (called with the lock held) -------------------------------

    def _current(self, indexed: IndexedManifest) -> bool:
        """Whether ``indexed`` still is what its file holds; re-reads the bytes only while a stat cannot tell."""
        try:
            stat = os.stat(indexed.path)
        except OSError:
            return False
        if file_stamp(stat) != indexed.stamp:
            return False
        if indexed.trusted:
            return True
        return self._reread(indexed) is indexed

    def _scan(self) -> None:
        """Bring the index up to date with the manifests on disk, reading only files that changed."""
        previous, invalid = self._by_path, self._invalid
        self._by_path, self._by_name, self._by_key, self._invalid = {}, {}, {}, {}
        # Sorted, so that of two names differing only in case the same one always wins.
        for path, parts, stat in sorted(self._manifest_stats(), reverse=True):
            stamp = file_stamp(stat)
            known = previous.get(path)
            if known is not None and stamp == known.stamp:
                indexed = known if known.trusted else self._reread(known)
            elif invalid.get(path) == stamp:
                self._invalid[path] = stamp
                continue
            else:
                name = known.name if known is not None else _name_of(parts)
                indexed = self._read(Path(path), name) if name is not None else None
            if indexed is not None:
                self._put(indexed)

    def _put(self, indexed: IndexedManifest) -> None:
        self._by_path[str(indexed.path)] = indexed
        self._by_name[indexed.name] = indexed
        self._by_key[indexed.name.key] = indexed

    def _reread(self, indexed: IndexedManifest) -> IndexedManifest | None:
        """``indexed`` itself (its record kept) when the file's bytes are unchanged, else a new entry."""
        fresh = self._read(indexed.path, indexed.name)
        if fresh is not None and fresh.entry.digest == indexed.entry.digest:
            indexed.stamp, indexed.checked_ns = fresh.stamp, fresh.checked_ns
            return indexed
        return fresh

    def _read(self, path: Path, name: ModelName) -> IndexedManifest | None:
        """Read, parse and hash one manifest file; None (remembered) when it is not a valid manifest."""
        checked = time.time_ns()
        try:
            with open(path, "rb") as file:
                data = file.read()
                stat = os.fstat(file.fileno())
        except OSError:
            return None
        indexed = _parse(name, path, data, stat, checked)
        if indexed is None:
            self._invalid[str(path)] = file_stamp(stat)
        return indexed

    def _manifest_stats(self) -> Iterator[tuple[str, tuple[str, ...], os.stat_result]]:
        """Every file four levels below ``manifests/`` (host/namespace/model/tag): path, those four parts, stat."""
        def walk(directory: str, parts: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], os.stat_result]]:
            try:
                with os.scandir(directory) as listing:
                    children = list(listing)
            except OSError:
                return
            for child in children:
                try:
                    if len(parts) < 3 and child.is_dir():
                        yield from walk(child.path, (*parts, child.name))
                    elif len(parts) == 3 and child.is_file():
                        yield child.path, (*parts, child.name), child.stat()
                except OSError:
                    continue  # removed meanwhile

        yield from walk(str(self.root / "manifests"), ())


def _name_of(parts: tuple[str, ...]) -> ModelName | None:
    """The name a manifest file's host/namespace/model/tag path gives; None for a stray file."""
    host, namespace, model, tag = parts
    try:
        return ModelName.parse(f"{host}/{namespace}/{model}:{tag}")
    except BadRequestError:
        return None  # temporary files and strays never parse as names


def _parse(name: ModelName, path: Path, data: bytes, stat: os.stat_result, checked: int) -> IndexedManifest | None:
    """An index entry for the manifest ``data`` read from ``path`` (at ``checked``, with ``stat``); None if invalid."""
    try:
        manifest = Manifest.from_bytes(data)
    except InvalidModelFileError:
        return None
    entry = ModelEntry(name, hashlib.sha256(data).hexdigest(), manifest.size, stat.st_mtime)
    return IndexedManifest(name, path, manifest, entry, file_stamp(stat), checked)


def _check_digest(path: Path, digest: str, expected: str | None) -> None:
    if expected is not None and parse_digest(expected) != parse_digest(digest):
        raise InvalidModelFileError(f"{path} has digest {digest}, expected {canonical_digest(expected)}")


@contextlib.contextmanager
def _temp_file(directory: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A hidden temporary file in ``directory``, removed unless it was renamed away."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit(out: BinaryIO, tmp: Path, target: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _atomic_write(target: Path, write: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temp_file(target.parent) as (out, tmp):
        write(out)
        _commit(out, tmp, target)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _share(source: Path, target: Path, *, hard: bool) -> bool:
    """Make ``target`` share ``source``'s bytes (a hard link only if ``hard``); False when the file system cannot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-link-{os.getpid()}-{time.monotonic_ns()}"
    if not (hard and _hard_link(source, tmp)) and not _clone(source, tmp):
        return False
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return True


def _hard_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _clone(source: Path, target: Path) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            os.fsync(dst.fileno())
        return True
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.ENOSYS):
            raise
        return False


def _prune_empty_dirs(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent

