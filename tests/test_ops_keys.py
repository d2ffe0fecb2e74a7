"""Scoped API keys: the keys file, ``mullama keys``, authorization by scope and model, and rates."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.cli import main
from mullama.errors import ForbiddenError, TooManyRequestsError, UnauthorizedError
from mullama.http.app import build_router
from mullama.ops.keys import (DEFAULT_KEY_NAME, OPEN, Keyring, KeysFileError, create_key, read_keys, revoke_key,
                              scope_of)
from mullama.ops.ratelimit import TokenBucket, retry_after

INFERENCE_ROUTES = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
                    "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens")
ADMIN_ROUTES = ("/api/pull", "/api/create", "/api/copy", "/api/delete", "/api/push", "/api/blobs/sha256:abc")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory of its own, and no key from the environment."""
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path))
    for name in ("MULLAMA_KEYS", "MULLAMA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_keys_command_creates_lists_and_revokes(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "ci", "--scope", "inference", "--model", "smollm2*", "--rpm", "30"]) == 0
    captured = capsys.readouterr()
    key = captured.out.strip()
    assert re.fullmatch(r"mk-[A-Za-z0-9_-]{43}", key) and "not shown again" in captured.err
    path = home / "keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text and key[3:] not in text
    (entry,) = json.loads(text)["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert (entry["name"], entry["scopes"], entry["models"], entry["rpm"], entry["tpm"]) == \
        ("ci", ["inference"], ["smollm2*"], 30, None)
    assert main(["keys", "create", "ops", "--scope", "admin", "--scope", "metrics"]) == 0
    second = capsys.readouterr().out.strip()
    assert second != key
    assert main(["keys", "create", "ci", "--scope", "admin"]) == 1
    assert "exists" in capsys.readouterr().err

    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key not in listing and second not in listing
    lines = listing.splitlines()
    assert lines[0].split() == ["NAME", "SCOPES", "MODELS", "RPM", "TPM", "KEY", "CREATED"]
    assert lines[1].split()[:6] == ["ci", "inference", "smollm2*", "30", "-", f"mk-...{key[-4:]}"]
    assert lines[2].split()[:3] == ["ops", "admin,metrics", "all"]

    keyring = Keyring(path)
    assert keyring.authorize("/api/chat", bearer(key)).name == "ci"
    assert main(["keys", "revoke", "ci"]) == 0
    assert "revoked 'ci'" in capsys.readouterr().out
    # The daemon's keyring notices the new file on the next request: no restart, no signal.
    with pytest.raises(UnauthorizedError):
        keyring.authorize("/api/chat", bearer(key))
    assert keyring.authorize("/api/chat", bearer(second)).name == "ops"
    assert main(["keys", "revoke", "ci"]) == 1
    assert "no key named 'ci'" in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("args, message", [
    (["keys", "create", "bad name", "--scope", "inference"], "key name"),
    (["keys", "create", DEFAULT_KEY_NAME, "--scope", "inference"], "MULLAMA_API_KEY"),
    (["keys", "create", "x", "--scope", "root"], "invalid choice"),
    (["keys", "create", "x"], "--scope"),
    (["keys", "create", "x", "--scope", "inference", "--rpm", "0"], "positive"),
    (["keys", "create", "x", "--scope", "inference", "--tpm", "many"], "invalid int"),
])
def test_keys_command_refuses_bad_arguments(home: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                            message: str) -> None:
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not (home / "keys.json").exists()


def test_without_keys_everyone_is_let_in(home: Path) -> None:
    keyring = Keyring.from_env()
    assert not keyring.enabled
    for path in (*INFERENCE_ROUTES, *ADMIN_ROUTES, "/metrics"):
        assert keyring.authorize(path, {}) is OPEN


def test_the_single_environment_key_has_every_scope(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULLAMA_API_KEY", "s3cret")
    keyring = Keyring.from_env()
    assert keyring.enabled
    for path in (*INFERENCE_ROUTES, *ADMIN_ROUTES, "/metrics", "/api/stats"):
        assert keyring.authorize(path, bearer("s3cret")).name == DEFAULT_KEY_NAME
        assert keyring.authorize(path, {"x-api-key": "s3cret"}).name == DEFAULT_KEY_NAME
        for headers in ({}, bearer("wrong"), {"x-api-key": "s3cre"}, {"Authorization": "Basic s3cret"}):
            with pytest.raises(UnauthorizedError):
                keyring.authorize(path, headers)
    assert keyring.authorize("/", {}).name == ""
    assert keyring.authorize("/api/chat", {"Authorization": "bearer   s3cret  "}).name == DEFAULT_KEY_NAME


def test_scopes_and_model_allowlists(home: Path) -> None:
    path = home / "keys.json"
    inference = create_key(path, "app", ["inference"], models=["smollm2", "qwen2.5:0.5b", "llama3*"])
    admin = create_key(path, "ops", ["admin"])
    metrics = create_key(path, "scraper", ["metrics"])
    keyring = Keyring(path)
    for route in INFERENCE_ROUTES:
        assert keyring.authorize(route, bearer(inference)).name == "app"
        assert keyring.authorize(route, {"x-api-key": admin}).name == "ops"
        with pytest.raises(ForbiddenError, match="inference"):
            keyring.authorize(route, bearer(metrics))
    for route in ADMIN_ROUTES + ("/api/not-a-route",):
        assert keyring.authorize(route, bearer(admin)).name == "ops"
        for key in (inference, metrics):
            with pytest.raises(ForbiddenError, match="admin"):
                keyring.authorize(route, bearer(key))
    for route in ("/metrics", "/api/stats"):
        assert keyring.authorize(route, bearer(metrics)).name == "scraper"
        with pytest.raises(ForbiddenError):
            keyring.authorize(route, bearer(inference))
    for route in ("/api/tags", "/api/ps", "/api/show", "/api/version", "/v1/models", "/v1/models/smollm2:135m"):
        for key in (inference, admin, metrics):
            keyring.authorize(route, bearer(key))
        with pytest.raises(UnauthorizedError):
            keyring.authorize(route, {})

    identity = keyring.authorize("/api/chat", bearer(inference), model="smollm2:135m")
    for allowed in ("smollm2:135m", "smollm2:latest", "qwen2.5:0.5b", "llama3.2:1b"):
        identity.require_model(allowed)
    for refused in ("smollm2-big:1b", "qwen2.5:7b", "mistral:7b"):
        with pytest.raises(ForbiddenError, match=re.escape(refused)):
            identity.require_model(refused)
    with pytest.raises(ForbiddenError):
        keyring.authorize("/api/chat", bearer(inference), model="qwen2.5:7b")
    keyring.authorize("/api/pull", bearer(admin)).require_model("anything:at-all")


def test_revoking_the_last_key_keeps_the_server_closed(home: Path) -> None:
    path = home / "keys.json"
    key = create_key(path, "only", ["inference"])
    keyring = Keyring(path)
    assert keyring.authorize("/api/chat", bearer(key)).name == "only"
    revoke_key(path, "only")
    assert read_keys(path) == []
    with pytest.raises(UnauthorizedError):
        keyring.authorize("/api/chat", bearer(key))
    with pytest.raises(UnauthorizedError):
        keyring.authorize("/api/chat", {})
    path.unlink()
    assert keyring.authorize("/api/chat", {}) is OPEN


def test_a_bad_keys_file_is_refused_at_start_and_ignored_on_reload(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = home / "keys.json"
    key = create_key(path, "ci", ["inference"])
    keyring = Keyring(path)
    good = path.read_text()
    for bad, message in (("{", "not JSON"), ('{"keys": {}}', '"keys" list'), ('{"keys": [{"name": "x"}]}', "sha256"),
                         ('{"keys": [1]}', "object"), ('{"keys": [], "x": 1}', None)):
        path.write_text(bad)
        if message is None:
            Keyring(path)  # unknown top-level fields are tolerated: a newer Mullama may add some
            continue
        with pytest.raises(KeysFileError, match=message):
            Keyring(path)
        with caplog.at_level(logging.ERROR, logger="mullama.keys"):
            assert keyring.authorize("/api/chat", bearer(key)).name == "ci"
        assert message in caplog.text
        caplog.clear()
        with pytest.raises(KeysFileError):
            keyring.reload()
        assert keyring.authorize("/api/chat", bearer(key)).name == "ci"
    entry = json.loads(good)["keys"][0]
    for field, value in (("scopes", []), ("scopes", ["root"]), ("rpm", 0), ("rpm", True), ("models", [""]),
                         ("name", DEFAULT_KEY_NAME), ("name", ""), ("sha256", "ABC"), ("colour", "red")):
        path.write_text(json.dumps({"keys": [entry | {field: value}]}))
        with pytest.raises(KeysFileError):
            Keyring(path)
    path.write_text(json.dumps({"keys": [entry, entry]}))
    with pytest.raises(KeysFileError, match="taken"):
        Keyring(path)


def test_request_and_token_rates(home: Path) -> None:
    path = home / "keys.json"
    once = create_key(path, "once", ["inference"], rpm=1)
    tokens = create_key(path, "tokens", ["inference"], tpm=100)
    keyring = Keyring(path)
    keyring.authorize("/api/chat", bearer(once))
    # One request a minute: the second waits about a minute (the test runs far faster than that).
    with pytest.raises(TooManyRequestsError) as caught:
        keyring.authorize("/api/chat", bearer(once))
    assert caught.value.status == 429 and 1 <= caught.value.retry_after <= 60
    assert "1 requests per minute" in caught.value.message
    # A refused request spends nothing; a denial on a route the key may not use is a 403 before any rate.
    with pytest.raises(ForbiddenError):
        keyring.authorize("/api/pull", bearer(once))

    for _ in range(3):
        keyring.authorize("/api/chat", bearer(tokens))
    keyring.charge("tokens", 150)  # 50 tokens in debt: the next request waits until it is paid back
    with pytest.raises(TooManyRequestsError) as caught:
        keyring.authorize("/api/chat", bearer(tokens))
    assert 30 <= caught.value.retry_after <= 31 and "100 tokens per minute" in caught.value.message
    keyring.charge("nobody", 10**6)  # a name without a rate (or no key at all) charges nothing

    # A reload that leaves a key's rates as they were keeps what it has spent; new rates start afresh.
    create_key(path, "another", ["inference"])
    with pytest.raises(TooManyRequestsError):
        keyring.authorize("/api/chat", bearer(once))


def test_token_bucket_arithmetic() -> None:
    now = [1000.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one a second, a minute's burst
    assert all(bucket.take() == 0.0 for _ in range(60))
    assert bucket.take() == pytest.approx(1.0)
    now[0] += 0.5
    assert bucket.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take() == 0.0
    now[0] += 3600
    assert all(bucket.take() == 0.0 for _ in range(60)) and bucket.take() > 0  # capped at capacity
    debt = TokenBucket(60, clock=lambda: now[0])
    assert debt.wait_time() == 0.0
    debt.charge(90)  # 30 below zero
    assert debt.wait_time() == pytest.approx(30.0)
    now[0] += 30.5
    assert debt.wait_time() == 0.0
    assert retry_after(0.01) == 1 and retry_after(2.2) == 3
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_every_route_of_the_daemon_has_a_deliberate_scope() -> None:
    admin = {"/api/create", "/api/copy", "/api/delete", "/api/pull", "/api/push", "/api/blobs/x"}
    for _method, pattern, _regex, _route in build_router().routes:
        path = re.sub(r"\{\w+(\.\.\.)?\}", "x", pattern)
        scope = scope_of(path)
        assert (scope == "admin") == (path in admin), (path, scope)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["Authorization", "x-api-key"]), st.text()))
def test_any_headers_give_an_identity_or_a_401(headers: dict[str, str]) -> None:
    keyring = Keyring(Path(__file__).parent / "data" / "absent-keys-file.json", "k")
    try:
        identity = keyring.authorize("/api/chat", headers)
    except UnauthorizedError:
        return
    assert identity.name == DEFAULT_KEY_NAME
