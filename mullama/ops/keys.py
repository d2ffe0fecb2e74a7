"""Scoped API keys: who may call which routes, on which models, how often.

Keys live in ``keys.json`` in the data directory (``MULLAMA_KEYS`` names
another file), written atomically with mode 0600 by ``mullama keys``. The
file holds each key's SHA-256, never the key: a key is 256 random bits, so
its hash cannot be reversed or guessed, and a slow password hash (scrypt,
PBKDF2) would add nothing but tens of milliseconds to every request. The
same randomness makes a salt pointless (no two keys, here or elsewhere, are
alike).

Each key has a name (what statistics and metrics are labelled with),
scopes, an optional model allowlist (names or glob patterns) and optional
rates (requests and tokens per minute). ``MULLAMA_API_KEY`` stays an
all-scopes key named ``default``. While neither exists, every request is
let in, as before keys; once the file exists, even with every key revoked,
a key is required.

The daemon notices a changed file on the next request (a ``stat`` call), so
``mullama keys revoke`` takes effect at once, without a restart.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mullama import config
from mullama.errors import ForbiddenError, MullamaError, TooManyRequestsError, UnauthorizedError
from mullama.filelock import exclusive
from mullama.ops.ratelimit import TokenBucket, retry_after

log = logging.getLogger("mullama.keys")

#: ``inference``: generate, chat, embeddings, reranking, the OpenAI and Anthropic routes; ``admin``: everything;
#: ``metrics``: ``/metrics`` and ``/api/stats`` (for a scraper that should not run models).
SCOPES = ("inference", "admin", "metrics")
#: The identity of ``MULLAMA_API_KEY``; no key in the file may take the name.
DEFAULT_KEY_NAME = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY_PREFIX = "mk-"

# Which scope each route needs. "public" needs no key; "read" any valid key (listings a client
# makes before it chooses a model). A route missing here needs "admin": unknown means closed.
_ROUTE_SCOPES: tuple[tuple[str, str], ...] = (
    ("/", "public"), ("/health", "public"), ("/v1/health", "public"),
    # The web UI's static files: a browser opening the page cannot send a key; the page asks for one for the API.
    ("/ui", "public"), ("/ui/*", "public"),
    ("/api/version", "read"), ("/api/tags", "read"), ("/api/ps", "read"), ("/api/show", "read"),
    ("/api/status", "read"), ("/v1/models", "read"), ("/v1/models/*", "read"),
    ("/api/generate", "inference"), ("/api/chat", "inference"), ("/api/embed", "inference"),
    ("/api/embeddings", "inference"), ("/api/apply-template", "inference"), ("/api/rerank", "inference"),
    ("/v1/rerank", "inference"), ("/v1/reranking", "inference"), ("/rerank", "inference"), ("/reranking", "inference"),
    ("/v1/chat/completions", "inference"), ("/v1/completions", "inference"), ("/v1/embeddings", "inference"),
    ("/v1/responses", "inference"), ("/v1/messages", "inference"), ("/v1/messages/count_tokens", "inference"),
    ("/v1/audio/transcriptions", "inference"), ("/v1/audio/translations", "inference"), ("/api/voice", "inference"),
    ("/metrics", "metrics"), ("/api/stats", "metrics"),
    # Ollama's account and cloud routes: Mullama only answers them as a signed-out Ollama without a cloud.
    ("/api/me", "read"), ("/api/signout", "read"), ("/api/user/keys/*", "read"), ("/api/experimental/*", "read"),
)


class KeysFileError(MullamaError):
    """The keys file cannot be read or is not a keys file."""


def scope_of(path: str) -> str:
    """The scope a request for ``path`` needs: ``public``, ``read``, one of :data:`SCOPES`; ``admin`` if unknown."""
    path = path.rstrip("/") or "/"
    for pattern, scope in _ROUTE_SCOPES:
        if path == pattern or (pattern.endswith("/*") and path.startswith(pattern[:-1]) and len(path) >
                               len(pattern) - 1):
            return scope
    return "admin"


def keys_path() -> Path:
    """The keys file: ``MULLAMA_KEYS``, else ``keys.json`` in the data directory."""
    explicit = os.environ.get("MULLAMA_KEYS")
    return Path(explicit).expanduser() if explicit else config.data_dir() / "keys.json"


def digest_of(key: str) -> str:
    """The SHA-256 a key is stored as."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# Keys as stored ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """One key of the file: everything but the key itself."""

    name: str
    digest: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    #: The key's last four characters, to tell keys apart in ``mullama keys list``.
    hint: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        """The entry as the file stores it."""
        return {"name": self.name, "sha256": self.digest, "hint": self.hint, "scopes": list(self.scopes),
                "models": list(self.models), "rpm": self.rpm, "tpm": self.tpm, "created_at": self.created_at}

    @classmethod
    def from_json(cls, value: Any, where: str) -> "KeyEntry":
        """Read one entry; :class:`KeysFileError` naming ``where`` and the field when it is not valid."""
        if not isinstance(value, dict):
            raise KeysFileError(f"{where}: a key must be an object")
        unknown = set(value) - {"name", "sha256", "hint", "scopes", "models", "rpm", "tpm", "created_at"}
        if unknown:
            raise KeysFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name = value.get("name")
        check_name(name, where)
        digest = value.get("sha256")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex digits")
        scopes = _strings(value.get("scopes"), f"{where}: scopes")
        if not scopes or any(scope not in SCOPES for scope in scopes):
            raise KeysFileError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
        models = _strings(value.get("models", []), f"{where}: models")
        rpm, tpm = (_rate(value.get(field_name), f"{where}: {field_name}") for field_name in ("rpm", "tpm"))
        hint, created = value.get("hint", ""), value.get("created_at", "")
        if not isinstance(hint, str) or not isinstance(created, str):
            raise KeysFileError(f"{where}: hint and created_at must be strings")
        return cls(name, digest, scopes, models, rpm, tpm, hint, created)


def check_name(name: Any, where: str = "key") -> None:
    """Raise :class:`KeysFileError` unless ``name`` is a valid key name (letters, digits, ``.``, ``_``, ``-``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeysFileError(f"{where}: a key name is 1 to 64 letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit; got {name!r}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise KeysFileError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _rate(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KeysFileError(f"{where} must be a positive integer or null")
    return value


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of the keys file at ``path`` ([] when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError(f'{path}: expected an object with a "keys" list')
    entries = [KeyEntry.from_json(item, f"{path}: keys[{i}]") for i, item in enumerate(data["keys"])]
    names = [entry.name for entry in entries]
    for name in names:
        if names.count(name) > 1 or name == DEFAULT_KEY_NAME:
            raise KeysFileError(f"{path}: the key name {name!r} is taken")
    return entries


def write_keys(path: Path, entries: Iterable[KeyEntry]) -> None:
    """Replace the keys file atomically: a new file of mode 0600, synced, renamed over the old one."""
    body = json.dumps({"keys": [entry.to_json() for entry in entries]}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if os.name == "posix":
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def create_key(path: Path, name: str, scopes: Iterable[str], *, models: Iterable[str] = (), rpm: int | None = None,
               tpm: int | None = None) -> str:
    """Add a key named ``name`` to the file and return it: the only time it exists in clear."""
    check_name(name)
    if name == DEFAULT_KEY_NAME:
        raise KeysFileError(f"the name {DEFAULT_KEY_NAME!r} belongs to MULLAMA_API_KEY; choose another")
    scopes = tuple(dict.fromkeys(scopes))
    if not scopes or any(scope not in SCOPES for scope in scopes):
        raise KeysFileError(f"scopes must be some of {', '.join(SCOPES)}")
    rpm, tpm = _rate(rpm, "--rpm"), _rate(tpm, "--tpm")
    key = _KEY_PREFIX + secrets.token_urlsafe(32)
    entry = KeyEntry(name, digest_of(key), scopes, tuple(models), rpm, tpm, key[-4:],
                     datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    with exclusive(path.with_name(f".{path.name}.lock")):
        entries = read_keys(path)
        if any(existing.name == name for existing in entries):
            raise KeysFileError(f"a key named {name!r} exists; revoke it first")
        write_keys(path, [*entries, entry])
    return key


def revoke_key(path: Path, name: str) -> None:
    """Remove the key named ``name``; :class:`KeysFileError` when there is none."""
    with exclusive(path.with_name(f".{path.name}.lock")):
        entries = read_keys(path)
        kept = [entry for entry in entries if entry.name != name]
        if len(kept) == len(entries):
            raise KeysFileError(f"no key named {name!r}")
        write_keys(path, kept)


# Keys in use ----------------------------------------------------------------------


class KeyLimiter:
    """A key's requests-per-minute and tokens-per-minute buckets."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rates = (rpm, tpm)
        self._requests = TokenBucket(rpm) if rpm else None
        self._tokens = TokenBucket(tpm) if tpm else None

    def admit(self, name: str) -> None:
        """Count one request; :class:`TooManyRequestsError` when a rate is spent."""
        if self._tokens is not None:
            wait = self._tokens.wait_time()
            if wait:
                raise TooManyRequestsError(f'the key "{name}" used its {self.rates[1]} tokens per minute',
                                           retry_after=retry_after(wait))
        if self._requests is not None:
            wait = self._requests.take()
            if wait:
                raise TooManyRequestsError(f'the key "{name}" used its {self.rates[0]} requests per minute',
                                           retry_after=retry_after(wait))

    def charge(self, tokens: int) -> None:
        """Charge the tokens a finished request read and generated."""
        if self._tokens is not None and tokens > 0:
            self._tokens.charge(tokens)


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: a key's name (``""`` while keys are off) and what it may do."""

    name: str
    scopes: frozenset[str]
    models: tuple[str, ...] = ()
    limiter: KeyLimiter | None = field(default=None, compare=False)

    def has_scope(self, scope: str) -> bool:
        """Whether this identity may use routes that need ``scope``."""
        return scope in ("public", "read") or "admin" in self.scopes or scope in self.scopes

    def require(self, scope: str) -> None:
        """:class:`ForbiddenError` unless this identity has ``scope``."""
        if not self.has_scope(scope):
            raise ForbiddenError(f'the key "{self.name}" does not have the {scope} scope')

    def allows_model(self, model: str) -> bool:
        """Whether the model allowlist (names or glob patterns) lets in ``model``; no list lets in all."""
        if not self.models:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) or (":" not in pattern and model.startswith(pattern + ":"))
                   for pattern in self.models)

    def require_model(self, model: str) -> None:
        """:class:`ForbiddenError` unless the allowlist lets in ``model``."""
        if not self.allows_model(model):
            raise ForbiddenError(f'the key "{self.name}" may not use the model "{model}"', param="model")


#: Everyone, while no key is configured.
OPEN = Identity("", frozenset(SCOPES))
#: A request to a public route of a server that has keys.
_PUBLIC = Identity("", frozenset())


def presented_key(headers: Mapping[str, str] | Any) -> str:
    """The key a request presents: ``Authorization: Bearer KEY``, else ``x-api-key: KEY``; "" for none."""
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return (headers.get("x-api-key") or "").strip()


class Keyring:
    """The keys the daemon accepts: the keys file plus ``MULLAMA_API_KEY``, reread when the file changes."""

    def __init__(self, path: Path, master_key: str | None = None) -> None:
        self.path = path
        self._master = master_key.encode("utf-8", "surrogatepass") if master_key else None
        #: (entries by digest, limiters by name, whether the file exists), replaced whole on reload.
        self._keys: tuple[dict[str, KeyEntry], dict[str, KeyLimiter], bool] = ({}, {}, False)
        self._file_state: tuple[int, int, int] | None = None
        self._reload_lock = threading.Lock()
        self.reload()

    @classmethod
    def from_env(cls) -> "Keyring":
        """The daemon's keyring: :func:`keys_path` and ``MULLAMA_API_KEY``."""
        return cls(keys_path(), os.environ.get("MULLAMA_API_KEY") or None)

    @property
    def enabled(self) -> bool:
        """True when requests need a key: ``MULLAMA_API_KEY`` is set or the keys file exists."""
        return self._master is not None or self._keys[2]

    def _state(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def reload(self) -> None:
        """Reread the keys file; on :class:`KeysFileError` the keys in use stay as they were."""
        with self._reload_lock:
            state = self._state()
            entries = read_keys(self.path)
            old = self._keys[1]
            limiters = {}
            for entry in entries:
                current = old.get(entry.name)
                # A key whose rates did not change keeps what it has spent.
                keep = current is not None and current.rates == (entry.rpm, entry.tpm)
                limiters[entry.name] = current if keep else KeyLimiter(entry.rpm, entry.tpm)
            self._keys = ({entry.digest: entry for entry in entries}, limiters, state is not None)
            self._file_state = state

    def _refresh(self) -> None:
        state = self._state()
        if state == self._file_state:
            return
        try:
            self.reload()
        except KeysFileError as exc:
            # Logged once per change of the file; the keys read before stay in force.
            self._file_state = state
            log.error("%s; keeping the keys read before", exc.message)

    def authenticate(self, headers: Mapping[str, str] | Any) -> Identity:
        """The identity of the key a request presents; :class:`UnauthorizedError` for a missing or wrong one."""
        self._refresh()
        entries, limiters, exists = self._keys
        if self._master is None and not exists:
            return OPEN
        given = presented_key(headers)
        if given:
            raw = given.encode("utf-8", "surrogatepass")
            if self._master is not None and hmac.compare_digest(raw, self._master):
                return Identity(DEFAULT_KEY_NAME, frozenset(SCOPES))
            entry = entries.get(hashlib.sha256(raw).hexdigest())
            if entry is not None:
                return Identity(entry.name, frozenset(entry.scopes), entry.models, limiters.get(entry.name))
        raise UnauthorizedError("invalid or missing API key")

    def authorize(self, path: str, headers: Mapping[str, str] | Any, model: str | None = None) -> Identity:
        """Check a request before it runs and return its identity.

        Raises :class:`UnauthorizedError` (401) for a missing or wrong key,
        :class:`ForbiddenError` (403) for a scope or model the key lacks,
        :class:`TooManyRequestsError` (429) when the key's rate is spent.
        ``model`` may be left out here and checked later with
        :meth:`Identity.require_model` once the body is read.
        """
        scope = scope_of(path)
        if scope == "public":
            return _PUBLIC if self.enabled else OPEN
        identity = self.authenticate(headers)
        identity.require(scope)
        if model is not None:
            identity.require_model(model)
        if identity.limiter is not None:
            identity.limiter.admit(identity.name)
        return identity

    def charge(self, name: str, tokens: int) -> None:
        """Charge a finished request's tokens to the key named ``name`` (no-op for a key without a token rate)."""
        limiter = self._keys[1].get(name)
        if limiter is not None:
            limiter.charge(tokens)
