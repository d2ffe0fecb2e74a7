"""What a killed daemon left in the store, removed when the next one starts (as Ollama prunes).

Every write to the store goes to a hidden temporary file that is renamed
into place once complete, and a manifest is written only after its blobs,
so a ``kill -9`` at any moment leaves the store consistent, plus litter:

- temporary files: ``.tmp-*`` (blobs and manifests being written),
  ``.upload-*`` (a blob upload), ``.quantize-*`` (a quantization's output);
- blobs no manifest names: a create killed between writing its blobs and
  its manifest, a delete killed before pruning, an upload never used.

Downloads in ``partial/`` are kept: the next pull of the model resumes
them. ``MULLAMA_NOPRUNE`` (or Ollama's ``OLLAMA_NOPRUNE``) keeps
unreferenced blobs, for a store shared with a tool that writes blobs first
and manifests later. The sweep runs once, when the daemon has bound its
port (so a second daemon that fails to start never sweeps the first's
store).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mullama import config
from mullama.errors import InvalidModelFileError
from mullama.store.blobs import Manifest, Store

log = logging.getLogger("mullama.store")

#: The prefixes of the store's temporary files.
TEMPORARY_PREFIXES = (".tmp-", ".upload-", ".quantize-")
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")


@dataclass
class SweepReport:
    """What a sweep removed."""

    temporary: int = 0
    unreferenced: int = 0
    #: Why unreferenced blobs were kept, when they were.
    kept_blobs: str = ""


def sweep(store: Store) -> SweepReport:
    """Remove the temporary files and, unless told not to, the blobs no manifest names."""
    report = SweepReport()
    for directory in (store.root, store.root / "blobs"):
        report.temporary += _remove(_temporary(directory))
    manifests = store.root / "manifests"
    if manifests.is_dir():
        report.temporary += _remove(path for path in manifests.rglob(".*")
                                    if path.is_file() and path.name.startswith(TEMPORARY_PREFIXES))
    if config.flag("NOPRUNE"):
        report.kept_blobs = f"{config.source('NOPRUNE')} is set"
        return report
    # Under the writers' lock: a CLI command may be writing a manifest that names a blob just admitted.
    with store.writing():
        referenced = _referenced(store, manifests)
        if referenced is None:
            report.kept_blobs = "a manifest could not be read"
            return report
        blobs = store.root / "blobs"
        if blobs.is_dir():
            report.unreferenced += _remove(path for path in blobs.iterdir()
                                           if _BLOB_NAME.fullmatch(path.name) and path.name not in referenced)
    return report


def _temporary(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [path for path in directory.iterdir() if path.name.startswith(TEMPORARY_PREFIXES) and path.is_file()]


def _referenced(store: Store, manifests: Path) -> set[str] | None:
    """The blob file names every manifest needs; None when one cannot be read (then nothing is pruned)."""
    names: set[str] = set()
    if not manifests.is_dir():
        return names
    for path in manifests.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            manifest = Manifest.from_bytes(path.read_bytes())
        except (OSError, InvalidModelFileError):
            log.warning("sweep: cannot read the manifest %s; keeping every blob", path)
            return None
        names |= {store.blob_path(digest).name for digest in manifest.digests()}
    return names


def _remove(paths: Iterable[Path]) -> int:
    count = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            count += 1
    return count
