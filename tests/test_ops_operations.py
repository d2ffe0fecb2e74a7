"""The operations facade: a request's record into metrics, statistics and key rates; reloads; health; JSON logs."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon import running

from mullama.engine.model import Timings
from mullama.errors import ForbiddenError, TooManyRequestsError
from mullama.ops.keys import Keyring, create_key
from mullama.ops.limits import Limits, LimitsError
from mullama.ops.logs import JsonFormatter, LogFormatError, configure_logging, request_id
from mullama.ops.metrics import Metrics, ModelUse
from mullama.ops.operations import Operations, RequestRecord, api_of
from mullama.ops.prometheus import render
from mullama.ops.stats import StatsStore

MS = 1_000_000


def make_ops(tmp: Path, *, models: list[ModelUse] | None = None, stopping: bool = False) -> Operations:
    return Operations(metrics=Metrics(models=lambda: models or []), keys=Keyring(tmp / "keys.json"),
                      limits=Limits(tmp / "limits.json"), stats=StatsStore(tmp / "stats.db"),
                      models=lambda: models or [], stopping=lambda: stopping)


def exposition(ops: Operations) -> str:
    return render(ops.metrics.registry.collect(), openmetrics=False).decode()


def test_timings_give_queue_wait_first_token_and_time_per_token() -> None:
    record = RequestRecord("ollama", "/api/chat")
    record.add_timings(Timings(load_duration=200 * MS, prompt_eval_count=12, prompt_eval_duration=50 * MS,
                               eval_count=11, eval_duration=100 * MS, total_duration=380 * MS))
    (generation,) = record.generations
    assert (record.prompt_tokens, record.generated_tokens) == (12, 11)
    assert generation.queue_wait == pytest.approx(0.030)
    assert generation.time_to_first_token == pytest.approx(0.280)
    assert generation.decode_seconds == pytest.approx(0.100)
    # A stream marks its first token itself: that mark is the time to first token, from the request's arrival.
    streamed = RequestRecord("openai", "/v1/chat/completions", started=100.0)
    streamed.first_token_at = 100.75
    streamed.first_token()  # a later call changes nothing
    streamed.add_timings(Timings(0, 5, 10 * MS, 3, 20 * MS, 40 * MS))
    assert streamed.generations[0].time_to_first_token == pytest.approx(0.75)
    # A load-only request (no tokens) has no time to first token.
    empty = RequestRecord("ollama", "/api/generate")
    empty.add_timings(Timings(load_duration=5 * MS, total_duration=6 * MS))
    assert empty.generations[0].time_to_first_token is None and empty.generated_tokens == 0


def test_finish_counts_metrics_statistics_and_the_key_rate(tmp_path: Path) -> None:
    key = create_key(tmp_path / "keys.json", "ci", ["inference"], tpm=30)
    ops = make_ops(tmp_path)
    try:
        identity = ops.authorize("/api/chat", {"Authorization": f"Bearer {key}"})
        record = ops.start("ollama", "/api/chat", identity.name)
        assert 'mullama_requests_in_flight{api="ollama"} 1.0' in exposition(ops)
        record.model = "smollm2:135m"
        record.add_timings(Timings(0, 20, 10 * MS, 21, 200 * MS, 215 * MS))
        ops.finish(record)
        text = exposition(ops)
        assert 'mullama_requests_in_flight{api="ollama"} 0.0' in text
        assert 'mullama_requests_total{api="ollama",route="/api/chat",model="smollm2:135m",status="200",key="ci"} 1.0' \
            in text
        assert 'mullama_prompt_tokens_total{api="ollama",model="smollm2:135m",key="ci"} 20.0' in text
        assert 'mullama_generated_tokens_total{api="ollama",model="smollm2:135m",key="ci"} 21.0' in text
        assert 'mullama_time_per_output_token_seconds_count{model="smollm2:135m"} 20' in text
        assert 'mullama_time_to_first_token_seconds_count{api="ollama",model="smollm2:135m"} 1' in text
        assert 'mullama_queue_wait_seconds_count{model="smollm2:135m"} 1' in text
        # 41 tokens against 30 a minute: the key is in debt, its next request waits.
        with pytest.raises(TooManyRequestsError):
            ops.authorize("/api/chat", {"Authorization": f"Bearer {key}"})
        failed = ops.start("openai", "/v1/chat/completions", "ci")
        failed.model, failed.status = "smollm2:135m", 500
        ops.finish(failed)
        unresolved = ops.start("ollama", "/api/chat")
        unresolved.status = 404  # no model: counted in metrics, not in per-model statistics
        ops.finish(unresolved)
        rows = ops.stats.query(since=0, until=2**40, by=["api"])  # type: ignore[union-attr]
        assert [(r.api, r.requests, r.errors, r.prompt_tokens, r.generated_tokens) for r in rows] == [
            ("ollama", 1, 0, 20, 21), ("openai", 1, 1, 0, 0)]
        assert 'status="404",key=""} 1.0' in exposition(ops)
    finally:
        ops.close()


def test_check_model_applies_the_key_allowlist_and_the_model_limits(tmp_path: Path) -> None:
    (tmp_path / "limits.json").write_text(json.dumps({"models": {"private:*": {"keys": ["ci"]}}}))
    key = create_key(tmp_path / "keys.json", "ci", ["inference"], models=["private:*", "smollm2"])
    other = create_key(tmp_path / "keys.json", "other", ["inference"])
    ops = make_ops(tmp_path)
    try:
        ci = ops.authorize("/api/chat", {"x-api-key": key})
        ops.check_model(ci, "private:1b")
        ops.check_model(ci, "smollm2:135m")
        with pytest.raises(ForbiddenError, match='the key "ci" may not use the model "qwen2.5:7b"'):
            ops.check_model(ci, "qwen2.5:7b")
        anyone = ops.authorize("/api/chat", {"x-api-key": other})
        ops.check_model(anyone, "qwen2.5:7b")
        with pytest.raises(ForbiddenError, match='the key "other" may not use the model "private:1b"'):
            ops.check_model(anyone, "private:1b")
    finally:
        ops.close()


def test_reload_keeps_the_old_rules_when_a_file_is_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"defaults": {"max_queue": 5}}))
    ops = make_ops(tmp_path)
    try:
        limits.write_text(json.dumps({"defaults": {"max_queue": 7}}))
        assert ops.reload()
        assert ops.limits.for_model("m:1").max_queue == 7
        limits.write_text('{"defaults": {"max_queue": -7}}')
        with caplog.at_level(logging.ERROR, logger="mullama.ops"):
            assert not ops.reload()
        assert "limits not reloaded" in caplog.text
        assert ops.limits.for_model("m:1").max_queue == 7
        (tmp_path / "keys.json").write_text("{")
        assert not ops.reload()
    finally:
        ops.close()


def test_status_and_stats_routes_on_a_daemon(tmp_path: Path) -> None:
    models = [ModelUse("smollm2:135m", 100_000_000, 4, 1, 3, 256, 8192)]
    (tmp_path / "limits.json").write_text(json.dumps({"models": {"smollm2": {"max_queue": 16, "pinned": True}}}))

    def get(port: int, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    for stopping in (False, True):
        ops = make_ops(tmp_path, models=models, stopping=stopping)
        try:
            with running(tmp_path / f"daemon-{stopping}") as server:
                server.app.ops = ops
                status, body = get(server.server_address[1], "/api/status")
                health = [get(server.server_address[1], path) for path in ("/health", "/v1/health")]
        finally:
            ops.close()
        assert health == [(503, {"status": "stopping"})] * 2 if stopping else [(200, {"status": "ok"})] * 2
        assert status == (503 if stopping else 200)
        assert body["status"] == ("stopping" if stopping else "ok") and body["queued"] == 3
        assert body["models"] == [{"name": "smollm2:135m", "memory_bytes": 100_000_000, "slots": 4, "busy_slots": 1,
                                   "queued": 3, "kv_cache_used_tokens": 256, "kv_cache_capacity_tokens": 8192,
                                   "limits": {"max_queue": 16, "pinned": True}}]

    # A daemon whose statistics database could not be opened answers /api/stats with a clear error.
    ops = Operations(metrics=Metrics(), keys=Keyring(tmp_path / "keys.json"), limits=Limits(tmp_path / "limits.json"))
    with running(tmp_path / "no-stats") as server:
        server.app.ops = ops
        status, body = get(server.server_address[1], "/api/stats")
    assert status == 503 and "statistics are off" in body["error"]


def test_create_reads_the_environment(tmp_path: Path) -> None:
    with running(tmp_path) as server:  # which sets MULLAMA_HOME to tmp_path / "home"
        ops = Operations.create(server.app.manager, server.app.stopping.is_set)
        try:
            assert ops.stats is not None and ops.stats.path == tmp_path / "home" / "stats.db"
            assert not ops.keys.enabled and ops.metrics.exposition(None)[0].count(b"mullama_loaded_models 0") == 1
        finally:
            ops.close()
        (tmp_path / "home" / "limits.json").write_text("[]")
        with pytest.raises(LimitsError, match="limits.json"):
            Operations.create(server.app.manager)


def test_json_logs_and_request_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setenv("MULLAMA_LOG_FORMAT", "json")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(stream)
        logging.getLogger("mullama.server").info("POST %s", "/api/chat", extra={"fields": {
            "request_id": "abc", "status": 200, "duration_seconds": 0.25, "message": "not overwritten"}})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mullama.server").exception("failed")
    finally:
        root.handlers[:], root.level = saved
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "POST /api/chat" and first["level"] == "info" and first["logger"] == "mullama.server"
    assert (first["request_id"], first["status"], first["duration_seconds"]) == ("abc", 200, 0.25)
    assert first["time"].endswith("+00:00")
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]
    monkeypatch.setenv("MULLAMA_LOG_FORMAT", "yaml")
    with pytest.raises(LogFormatError, match="text, json"):
        configure_logging(io.StringIO())
    assert isinstance(JsonFormatter().format(logging.LogRecord("x", 20, "f", 1, "%s", ("é",), None)), str)

    assert request_id("req-123_ABC.def:9") == "req-123_ABC.def:9"
    for bad in (None, "", "has space", "x" * 129, "new\nline", "é"):
        generated = request_id(bad)
        assert len(generated) == 32 and generated != bad
    assert request_id(None) != request_id(None)


def test_api_of_paths() -> None:
    assert [api_of(path) for path in ("/api/chat", "/api", "/v1/chat/completions", "/v1/messages",
                                      "/v1/messages/count_tokens", "/", "/metrics", "/ui")] == [
        "ollama", "ollama", "openai", "anthropic", "anthropic", "", "", ""]


def test_a_full_queue_is_refused_with_the_models_recent_pace(tmp_path: Path) -> None:
    (tmp_path / "limits.json").write_text(json.dumps({"models": {"m": {"max_queue": 2}}}))
    ops = make_ops(tmp_path)
    try:
        ops.check_queue("other:1", 1, 1, 500)  # no max_queue: the batcher's own bound applies
        ops.check_queue("m:1", 4, 3, 0)  # a free sequence: nobody waits
        ops.check_queue("m:1", 2, 2, 1)  # waits, behind one of two allowed
        with pytest.raises(TooManyRequestsError, match="2 requests already wait") as first:
            ops.check_queue("m:1", 2, 2, 2)
        assert first.value.retry_after == 8  # nothing finished yet: 5 s a request, 3 ahead over 2 sequences
        done = ops.start("ollama", "/api/chat")
        done.model, done.started = "m:1", done.started - 20.0
        done.add_timings(Timings(0, 1, MS, 1, MS, 2 * MS))
        ops.finish(done)
        with pytest.raises(TooManyRequestsError) as paced:
            ops.check_queue("m:1", 2, 2, 2)
        assert 30 <= paced.value.retry_after <= 31  # 20 s a request now
    finally:
        ops.close()
