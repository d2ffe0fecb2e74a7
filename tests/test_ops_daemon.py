"""Operations wired into a live daemon: scoped keys, rate limits and per-model limits through the official clients.

Each refusal is checked in the error shape of the API it came through (the
``ollama``, ``openai`` and ``anthropic`` SDKs), with ``Retry-After`` on a
429; request ids are echoed on every answer, errors included.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from daemon import anthropic_client, create_model, openai_client, running
from hub_server import HubServer
from test_ops_metrics import poll

from mullama.cli.format import ps_table
from mullama.http.server import Server
from mullama.ops.keys import create_key

HELLO = [{"role": "user", "content": "Hi"}]
#: A few tokens, greedy: enough to count, cheap on two cores.
SHORT = {"num_predict": 3, "temperature": 0}


def call(port: int, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers (lower-case names) and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, data, {**({"Content-Type": "application/json"} if data else {}), **headers})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def scraped(port: int, *lines: str, **headers: str) -> str:
    """``/metrics`` once it holds every one of ``lines``.

    A request is counted right after its last byte went out, so its client
    may ask before that: the scrape is repeated until the lines are there.
    """
    def holding() -> str | None:
        text = call(port, "GET", "/metrics", **headers)[2].decode()
        return text if all(line in text for line in lines) else None

    return poll(holding, 30, lambda: f"/metrics never held {lines}: {call(port, 'GET', '/metrics', **headers)}")


def bearer(key: str) -> dict[str, str]:
    """The header that presents ``key``."""
    return {"Authorization": f"Bearer {key}"}


def ollama_client(server: Server, key: str | None = None) -> ollama.Client:
    """The official ``ollama`` SDK on ``server``, presenting ``key``."""
    return ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120,
                         headers=bearer(key) if key else None)


def sdks(server: Server, key: str) -> tuple[ollama.Client, openai.OpenAI, anthropic.Anthropic]:
    """The three official clients on ``server``, each presenting ``key`` its own way."""
    return (ollama_client(server, key), openai_client(server, 120).with_options(api_key=key),
            anthropic_client(server, 120).with_options(api_key=key))


def refusals(server: Server, key: str, model: str) -> tuple[Any, Any, Any]:
    """A chat on ``model`` through each SDK, each expected to fail: the three exceptions."""
    with_ollama, with_openai, with_anthropic = sdks(server, key)
    with pytest.raises(ollama.ResponseError) as by_ollama:
        with_ollama.chat(model=model, messages=HELLO, options=SHORT)
    with pytest.raises(openai.APIStatusError) as by_openai:
        with_openai.chat.completions.create(model=model, messages=HELLO, max_tokens=3)
    with pytest.raises(anthropic.APIStatusError) as by_anthropic:
        with_anthropic.messages.create(model=model, max_tokens=3, messages=HELLO)
    return by_ollama.value, by_openai.value, by_anthropic.value


def assert_shapes(errors: tuple[Any, Any, Any], status: int, openai_type: str, anthropic_type: str,
                  message: str) -> None:
    """Each API's own error body for ``status``, all naming ``message``."""
    by_ollama, by_openai, by_anthropic = errors
    assert by_ollama.status_code == status and message in by_ollama.error
    assert by_openai.status_code == status and by_openai.body["type"] == openai_type
    assert message in by_openai.body["message"]
    assert by_anthropic.status_code == status and by_anthropic.body["type"] == "error"
    assert by_anthropic.body["error"]["type"] == anthropic_type and message in by_anthropic.body["error"]["message"]


# Scoped keys ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A daemon with the test model as ``smol`` and a keys file; yields it and its keys by name."""
    tmp = tmp_path_factory.mktemp("keys")
    with running(tmp) as server:
        create_model(server.server_address[1], model_path, "smol", parameters={"num_thread": 1})
        path = tmp / "home" / "keys.json"
        keys = {
            "admin": create_key(path, "admin", ["admin"]),
            "ci": create_key(path, "ci", ["inference"], models=["smol"]),
            "elsewhere": create_key(path, "elsewhere", ["inference"], models=["other*"]),
            "grafana": create_key(path, "grafana", ["metrics"]),
            **{f"once-{api}": create_key(path, f"once-{api}", ["inference"], rpm=1)
               for api in ("ollama", "openai", "anthropic")},
        }
        yield server, keys


def test_a_missing_scope_is_403_in_each_api_shape(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    errors = refusals(server, keys["grafana"], "smol")
    assert_shapes(errors, 403, "permission_error", "permission_error", "does not have the inference scope")


def test_a_model_outside_the_allowlist_is_403(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    errors = refusals(server, keys["elsewhere"], "smol")
    assert_shapes(errors, 403, "permission_error", "permission_error", 'may not use the model "smol:latest"')
    # Nothing was loaded for a refused request: the check comes before the load.
    assert not server.app.manager.running()


def test_a_spent_rate_is_429_with_retry_after(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    port = server.server_address[1]
    with_ollama = sdks(server, keys["once-ollama"])[0]
    with_openai = sdks(server, keys["once-openai"])[1]
    with_anthropic = sdks(server, keys["once-anthropic"])[2]
    for api in ("ollama", "openai", "anthropic"):
        # The key's one request a minute goes to a listing; the chat after it is refused.
        assert call(port, "GET", "/api/tags", **bearer(keys[f"once-{api}"]))[0] == 200
    with pytest.raises(ollama.ResponseError) as by_ollama:
        with_ollama.chat(model="smol", messages=HELLO, options=SHORT)
    with pytest.raises(openai.RateLimitError) as by_openai:
        with_openai.chat.completions.create(model="smol", messages=HELLO, max_tokens=3)
    with pytest.raises(anthropic.RateLimitError) as by_anthropic:
        with_anthropic.messages.create(model="smol", max_tokens=3, messages=HELLO)
    assert_shapes((by_ollama.value, by_openai.value, by_anthropic.value), 429, "rate_limit_error",
                  "rate_limit_error", "requests per minute")
    for error in (by_openai.value, by_anthropic.value):
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
    status, headers, _ = call(port, "GET", "/api/tags", **bearer(keys["once-ollama"]))
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60


def test_keys_are_checked_before_paths_and_unloading_needs_admin(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    port = server.server_address[1]
    # No probing which routes exist without a key: a missing key is a 401 before any 404 or 405.
    assert call(port, "GET", "/api/no-such-route")[0] == 401
    assert call(port, "GET", "/api/chat")[0] == 401
    assert call(port, "GET", "/api/no-such-route", **bearer(keys["ci"]))[0] == 404
    assert call(port, "GET", "/api/chat", **bearer(keys["ci"]))[0] == 405
    assert call(port, "GET", "/")[0] == 200  # "Ollama is running" stays public for health checks
    with_ci = ollama_client(server, keys["ci"])
    with pytest.raises(ollama.ResponseError) as pull:
        with_ci.pull("smol")
    assert pull.value.status_code == 403 and "admin scope" in pull.value.error
    # An empty chat with keep_alive 0 unloads: an administrator's act, not an inference.
    with pytest.raises(ollama.ResponseError) as unload:
        with_ci.chat(model="smol", messages=[], keep_alive=0)
    assert unload.value.status_code == 403
    assert ollama_client(server, keys["admin"]).chat(model="smol", messages=[], keep_alive=0).done_reason == "unload"


def test_requests_are_labelled_by_key_in_metrics_and_statistics(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    port = server.server_address[1]
    answer = ollama_client(server, keys["ci"]).chat(model="smol", messages=HELLO, options=SHORT)
    scraped(port, f'mullama_generated_tokens_total{{api="ollama",model="smol:latest",key="ci"}} '
                  f'{float(answer.eval_count)}', **bearer(keys["grafana"]))

    def by_key() -> dict[str, Any] | None:
        status, _, body = call(port, "GET", "/api/stats?by=key&model=smol", **bearer(keys["grafana"]))
        assert status == 200, body
        return {row["key"]: row for row in json.loads(body)["stats"]}.get("ci")

    row = poll(by_key, 30, lambda: "the statistics never showed the key ci")
    assert row["requests"] == 1 and row["generated_tokens"] == answer.eval_count
    # Statistics and metrics need the metrics scope (or admin), not inference.
    assert call(port, "GET", "/metrics", **bearer(keys["ci"]))[0] == 403


def test_request_ids_are_echoed_on_every_answer(guarded: tuple[Server, dict[str, str]]) -> None:
    server, keys = guarded
    port = server.server_address[1]
    status, headers, _ = call(port, "GET", "/api/tags", **{"X-Request-Id": "trace-42.a:b", **bearer(keys["ci"])})
    assert status == 200 and headers["x-request-id"] == "trace-42.a:b"
    status, headers, _ = call(port, "GET", "/api/tags", **{"X-Request-Id": "trace-43"})
    assert status == 401 and headers["x-request-id"] == "trace-43"
    _, first, _ = call(port, "GET", "/")
    _, second, _ = call(port, "GET", "/", **{"X-Request-Id": "not a token"})
    assert len(first["x-request-id"]) == 32 and len(second["x-request-id"]) == 32
    assert first["x-request-id"] != second["x-request-id"]


# Per-model limits -----------------------------------------------------------------------

#: A JSON string of at least 100,000 characters: a generation that only the context's end or the client stops.
ENDLESS = {"type": "string", "minLength": 100_000}


def test_model_limits_are_applied_and_a_full_queue_is_429(model_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "limits.json").write_text(json.dumps({"models": {
        "smol": {"max_parallel": 1, "max_queue": 0, "max_context": 1024},
        "big": {"max_memory": "1MB"},
    }}))
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol", parameters={"num_thread": 1})
        create_model(port, model_path, "big", parameters={"num_thread": 1})
        client = ollama_client(server)
        stream = client.chat(model="smol", messages=HELLO, format=ENDLESS, stream=True,
                             options={"num_predict": -1, "num_ctx": 4096, "num_parallel": 4, "temperature": 0})
        try:
            assert not next(stream).done  # the model's one sequence is generating
            (loaded,) = json.loads(call(port, "GET", "/api/ps")[2])["models"]
            assert (loaded["context_length"], loaded["num_parallel"], loaded["active"]) == (1024, 1, 1)
            assert loaded["limits"] == {"max_parallel": 1, "max_queue": 0, "max_context": 1024}
            errors = refusals(server, "unused", "smol")
            assert_shapes(errors, 429, "rate_limit_error", "rate_limit_error", "max_queue is 0")
            for error in errors[1:]:
                assert int(error.response.headers["retry-after"]) >= 1
            # The refusals came while the generation ran: it is running still.
            assert server.app.manager.running()[0].batcher.active_count == 1
        finally:
            stream.close()
        # A load beyond the model's max_memory is refused before it happens.
        with pytest.raises(ollama.ResponseError) as big:
            client.generate(model="big", prompt="Hi", options=SHORT)
        assert big.value.status_code == 500 and "max_memory" in big.value.error
        assert [m.model for m in client.ps().models] == ["smol:latest"]
        # A stream cut by shutdown began as a 200: it is counted with the error its last event carries.
        server.app.stopping.set()
        try:
            with pytest.raises(anthropic.APIStatusError):
                for _ in anthropic_client(server, 120).messages.create(model="smol", max_tokens=3, messages=HELLO,
                                                                       stream=True):
                    pass
        finally:
            server.app.stopping.clear()
        scraped(port, 'mullama_requests_total{api="anthropic",route="/v1/messages",model="smol:latest",status="503",'
                      'key=""} 1.0')


# Pulls and `mullama ps` ----------------------------------------------------------------


def test_pulls_and_their_bytes_are_counted(model_path: Path, tmp_path: Path) -> None:
    repo, file = "someone/SmolLM2-135M-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
    with HubServer() as hub:
        hub.add(repo, file, model_path)
        with running(tmp_path, HF_ENDPOINT=hub.endpoint) as server:
            client = ollama_client(server)
            assert client.pull(f"hf.co/{repo}:q4_1").status == "success"
            # Pulled again: the blob is there, nothing is downloaded.
            assert client.pull(f"hf.co/{repo}:q4_1").status == "success"
            with pytest.raises(ollama.ResponseError):
                client.pull("hf.co/someone/missing:q4_1")
            scraped(server.server_address[1], 'mullama_pulls_total{outcome="ok"} 2.0',
                    'mullama_pulls_total{outcome="error"} 1.0',
                    f"mullama_pull_bytes_total {float(model_path.stat().st_size)}")


def test_ps_shows_limits_only_when_a_model_has_some() -> None:
    model = {"name": "smol:latest", "digest": "a" * 64, "size": 2000, "size_vram": 0, "context_length": 1024,
             "expires_at": "0001-01-01T00:00:00Z", "queued": 2}
    plain = ps_table([model | {"limits": {}}]).splitlines()
    assert plain[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    limited = ps_table([model | {"limits": {"max_parallel": 1, "max_queue": 8, "keep_alive": -1.0, "pinned": True,
                                            "max_memory": 6 * 2**30, "keys": ["ci", "alice"]}}]).splitlines()
    assert limited[0].split()[-1] == "LIMITS"
    assert limited[1].endswith("parallel 1, queue 2/8, memory 6.4 GB, keep forever, pinned, keys ci,alice")
