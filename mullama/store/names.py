"""Model names and blob digests, with Ollama's grammar and on-disk layout.

A name is ``[host/][namespace/]model[:tag]``; missing parts default to
``registry.ollama.ai``, ``library`` and ``latest``. Every part is checked
against Ollama's character and length rules before it becomes a path
component, so no name or digest can address a file outside the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mullama.errors import BadRequestError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's rules (types/model/name.go): the first character is alphanumeric
# or "_"; ":" is allowed only in hosts (a port) and "." nowhere in namespaces.
_PARTS = {
    "host": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*"), 350),
    "namespace": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*"), 80),
    "model": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"), 80),
    "tag": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"), 80),
}
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")


@dataclass(frozen=True)
class ModelName:
    """A fully qualified model name; compare names with :attr:`key`."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse ``[scheme://][host/][namespace/]model[:tag]``, filling in defaults.

        Raises :class:`BadRequestError` for anything Ollama would reject.
        """
        if not isinstance(text, str) or not text.strip():
            raise BadRequestError("a model name is required", param="model")
        rest = text.strip()
        if "://" in rest:
            # Ollama accepts a scheme before the host (https://host/ns/model).
            rest = rest.split("://", 1)[1]
        tag = DEFAULT_TAG
        # "/" cannot occur in a tag, so a ":" after the last "/" starts the tag
        # (and one before it belongs to a host's port).
        if rest.rfind(":") > rest.rfind("/"):
            rest, tag = rest.rsplit(":", 1)
        parts = rest.split("/")
        if len(parts) > 3:
            raise BadRequestError(f'invalid model name "{text}": too many "/" separators', param="model")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        name = cls(host, namespace, model, tag)
        for kind in _PARTS:
            _check_part(kind, getattr(name, kind), text)
        return name

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The case-insensitive identity: two names match when their keys are equal."""
        return (self.host.casefold(), self.namespace.casefold(), self.model.casefold(), self.tag.casefold())

    @property
    def display(self) -> str:
        """The short form Ollama prints: ``llama3.2:1b``, ``user/model:tag``, ``host/ns/model:tag``."""
        if self.host.casefold() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.casefold() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.display

    def parts(self) -> tuple[str, str, str, str]:
        """The four path components, each re-validated so none can climb out of a directory."""
        for kind in _PARTS:
            _check_part(kind, getattr(self, kind), self.display)
        return (self.host, self.namespace, self.model, self.tag)

    def manifest_path(self, root: Path) -> Path:
        """Where this name's manifest lives: ``root/manifests/host/namespace/model/tag``."""
        return _inside(Path(root) / "manifests", *self.parts())


def _check_part(kind: str, value: str, text: str) -> None:
    pattern, limit = _PARTS[kind]
    if not 1 <= len(value) <= limit or not pattern.fullmatch(value):
        raise BadRequestError(f'invalid model name "{text}": bad {kind} "{value[:100]}"', param="model")


def parse_digest(digest: str) -> str:
    """Return the 64 hex digits of ``sha256:<hex>`` or ``sha256-<hex>``; raise otherwise."""
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise BadRequestError(f'invalid digest "{str(digest)[:100]}": expected sha256:<64 lowercase hex>')
    return match.group(1)


def canonical_digest(digest: str) -> str:
    """The ``sha256:<hex>`` form used in manifests and the API."""
    return "sha256:" + parse_digest(digest)


def blob_path(root: Path, digest: str) -> Path:
    """The file holding a blob: ``root/blobs/sha256-<hex>``."""
    return _inside(Path(root) / "blobs", "sha256-" + parse_digest(digest))


def _inside(base: Path, *parts: str) -> Path:
    # The grammar already excludes separators and dot-only parts; this is the
    # belt to its braces, so a future grammar change cannot open a traversal.
    path = base.joinpath(*parts)
    if any(part in ("", ".", "..") or "/" in part or "\\" in part for part in parts):
        raise BadRequestError(f"refusing a path outside {base}")
    return path
