"""Prometheus metrics: the registry and both expositions, checked by ``promtool`` and scraped by a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ollama
import pytest
from daemon import anthropic_client, create_model, free_port, openai_client, running

from mullama.ffi import loader
from mullama.ops.metrics import BuildInfo, Metrics, ModelUse
from mullama.ops.prometheus import (OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Registry, negotiate, render)
from mullama.ops.process import read_process

#: What Prometheus 2.x sends: OpenMetrics first.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def needs(tool: str) -> str:
    """The path of ``tool``; the test fails (never skips) without it: ``.ci/run`` installs it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install Debian's prometheus package (.ci/run does)")
    return path


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on ``exposition`` (it reads the text format from stdin)."""
    return subprocess.run([needs("promtool"), "check", "metrics"], input=exposition.decode(), capture_output=True,
                          text=True, timeout=60, check=False)


def populated(models: list[ModelUse] | None = None) -> Metrics:
    """Every Mullama family with a few observations in it."""
    metrics = Metrics(models=lambda: models if models is not None else [
        ModelUse("smollm2:135m", 150_000_000, 4, 1, 2, 512, 8192), ModelUse('odd"name\\x:1b', 1, 1, 0, 0, 0, 0)],
        build=BuildInfo("0.1.0", "0c1e57098bba43ac29e6e3b677cdceebdd22334f", "cpu"))
    for status in (200, 200, 404, 429):
        metrics.request_started("ollama")
        metrics.request_finished("ollama", "/api/chat", "smollm2:135m", status, "ci", 0.25)
    metrics.request_started("openai")
    metrics.request_finished("openai", "/v1/chat/completions", "smollm2:135m", 200, "", 1.5)
    metrics.request_started("anthropic")  # still in flight
    metrics.tokens("ollama", "smollm2:135m", "ci", 120, 64)
    metrics.generation("ollama", "smollm2:135m", queue_wait=0.02, time_to_first_token=0.3, decode_seconds=0.63,
                       generated_tokens=64)
    metrics.model_loaded("smollm2:135m", 1.7)
    metrics.model_loaded("broken:1b", 0.2, ok=False)
    metrics.model_evicted("smollm2:135m", "expired", 0.05)
    metrics.pull_finished(True)
    metrics.pull_finished(False)
    metrics.pulled(104_857_600)
    return metrics


# The registry and the formats -------------------------------------------------------


def test_text_exposition_is_exact() -> None:
    registry = Registry()
    counter = registry.counter("demo_requests", "Requests.\nSecond line \\ here.", ("route", "status"))
    counter.labels('/a"b', 200).inc()
    counter.labels('/a"b', "200").inc(2)  # the same series as the int 200
    gauge = registry.gauge("demo_temperature_celsius", "A gauge.", unit="celsius")
    gauge.set(-3.5)
    histogram = registry.histogram("demo_latency_seconds", "A histogram.", buckets=(0.1, 1.0), unit="seconds")
    histogram.observe(0.05)
    histogram.observe(0.5, count=3)
    histogram.observe(7)
    assert render(registry.collect(), openmetrics=False).decode() == (
        "# HELP demo_requests_total Requests.\\nSecond line \\\\ here.\n"
        "# TYPE demo_requests_total counter\n"
        'demo_requests_total{route="/a\\"b",status="200"} 3.0\n'
        "# HELP demo_temperature_celsius A gauge.\n"
        "# TYPE demo_temperature_celsius gauge\n"
        "demo_temperature_celsius -3.5\n"
        "# HELP demo_latency_seconds A histogram.\n"
        "# TYPE demo_latency_seconds histogram\n"
        'demo_latency_seconds_bucket{le="0.1"} 1\n'
        'demo_latency_seconds_bucket{le="1.0"} 4\n'
        'demo_latency_seconds_bucket{le="+Inf"} 5\n'
        "demo_latency_seconds_count 5\n"
        "demo_latency_seconds_sum 8.55\n"
    )


def test_openmetrics_exposition_is_exact() -> None:
    registry = Registry()
    registry.counter("demo_pulls", "Pulls.", ("outcome",)).labels("ok").inc()
    registry.counter("demo_read_bytes", "Bytes.", unit="bytes").inc(10)
    body = render(registry.collect(), openmetrics=True).decode()
    assert body == (
        "# TYPE demo_pulls counter\n"
        "# HELP demo_pulls Pulls.\n"
        'demo_pulls_total{outcome="ok"} 1.0\n'
        "# TYPE demo_read_bytes counter\n"
        "# UNIT demo_read_bytes bytes\n"
        "# HELP demo_read_bytes Bytes.\n"
        "demo_read_bytes_total 10.0\n"
        "# EOF\n"
    )
    with_created = render(registry.collect(), openmetrics=True, created=True).decode()
    created = [line for line in with_created.splitlines() if line.startswith("demo_pulls_created")]
    assert len(created) == 1 and abs(float(created[0].split()[-1]) - time.time()) < 3600


def test_negotiation_follows_the_accept_header() -> None:
    assert negotiate(PROMETHEUS_ACCEPT)
    assert negotiate("application/openmetrics-text")
    assert not negotiate(None)
    assert not negotiate("text/plain;version=0.0.4")
    assert not negotiate("*/*")
    assert not negotiate("application/openmetrics-text;q=0, text/plain")
    assert not negotiate("application/openmetrics-text;q=0.4, text/plain;q=0.5")
    assert not negotiate("application/openmetrics-text;q=bogus")
    body, content_type = populated().exposition(PROMETHEUS_ACCEPT)
    assert content_type == OPENMETRICS_CONTENT_TYPE and body.endswith(b"\n# EOF\n")
    body, content_type = populated().exposition("text/plain")
    assert content_type == TEXT_CONTENT_TYPE and b"# EOF" not in body


def test_names_are_checked() -> None:
    registry = Registry()
    for bad in ("9lives", "has-dash", "ends_total", "ends_count", ""):
        with pytest.raises(ValueError):
            registry.counter(bad, "x")
    with pytest.raises(ValueError):
        registry.gauge("demo_size", "x", unit="bytes")
    with pytest.raises(ValueError):
        registry.histogram("demo_h", "x", ("le",), buckets=(1,))
    with pytest.raises(ValueError):
        registry.histogram("demo_h", "x", buckets=(2, 1))
    registry.gauge("demo_taken", "x")
    with pytest.raises(ValueError):
        registry.counter("demo_taken", "x")
    with pytest.raises(ValueError):
        registry.counter("demo_c", "x", ("a",)).labels("1", "2")
    with pytest.raises(ValueError):
        registry.counter("demo_d", "x").inc(-1)


def test_concurrent_increments_are_all_counted() -> None:
    registry = Registry()
    counter = registry.counter("demo_hits", "x", ("thread",))
    histogram = registry.histogram("demo_seconds", "x", buckets=(0.5,), unit="seconds")
    # A switch interval of a microsecond makes the interpreter interleave threads mid-increment.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def work() -> None:
            for _ in range(20_000):
                counter.labels("shared").inc()
                histogram.observe(0.25)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    text = render(registry.collect(), openmetrics=False).decode()
    assert 'demo_hits_total{thread="shared"} 80000.0' in text
    assert "demo_seconds_count 80000" in text and "demo_seconds_sum 20000.0" in text


def test_a_failing_collector_leaves_the_rest_of_the_scrape() -> None:
    registry = Registry()
    registry.gauge("demo_ok", "x").set(1)

    def broken() -> list[Any]:
        raise RuntimeError("boom")

    registry.add_collector(broken)
    assert "demo_ok 1.0" in render(registry.collect(), openmetrics=False).decode()


def test_time_per_output_token_counts_each_token() -> None:
    metrics = Metrics()
    metrics.generation("ollama", "m", queue_wait=None, time_to_first_token=None, decode_seconds=0.9,
                       generated_tokens=10)
    text = render(metrics.registry.collect(), openmetrics=False).decode()
    assert 'mullama_time_per_output_token_seconds_count{model="m"} 9' in text
    assert 'mullama_time_per_output_token_seconds_bucket{model="m",le="0.1"} 9' in text
    assert 'mullama_time_per_output_token_seconds_bucket{model="m",le="0.075"} 0' in text


def test_process_reading_is_this_process() -> None:
    reading = read_process()
    assert reading.threads >= 1 and reading.cpu_seconds > 0
    if os.path.exists("/proc/self/stat"):
        assert reading.resident_bytes and reading.resident_bytes > 1_000_000
        assert reading.open_fds and reading.open_fds >= 3
        assert reading.start_time and reading.start_time <= time.time()
        # Threads that certainly exist while they wait: the reading must see them (a thread that
        # just ended may linger a moment in the kernel, so only a lower bound is exact).
        finish = threading.Event()
        threads = [threading.Thread(target=finish.wait) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            assert read_process().threads >= 4
        finally:
            finish.set()
            for thread in threads:
                thread.join()


# promtool ----------------------------------------------------------------------------


def test_promtool_accepts_every_mullama_family() -> None:
    body, _ = populated().exposition("text/plain")
    text = body.decode()
    for family in ("mullama_requests_total", "mullama_requests_in_flight", "mullama_prompt_tokens_total",
                   "mullama_generated_tokens_total", "mullama_request_duration_seconds",
                   "mullama_time_to_first_token_seconds", "mullama_time_per_output_token_seconds",
                   "mullama_queue_wait_seconds", "mullama_model_loads_total", "mullama_model_load_duration_seconds",
                   "mullama_model_evictions_total", "mullama_model_eviction_duration_seconds", "mullama_pulls_total",
                   "mullama_pull_bytes_total", "mullama_loaded_models", "mullama_model_memory_bytes",
                   "mullama_slots_busy", "mullama_slots_free", "mullama_queue_depth", "mullama_kv_cache_used_tokens",
                   "mullama_kv_cache_capacity_tokens", "mullama_kv_cache_usage_ratio", "mullama_build_info",
                   "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                   "process_threads"):
        assert f"# TYPE {family} " in text, family
    checked = promtool_check(body)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        checked.stdout + checked.stderr


def test_promtool_rejects_what_is_not_an_exposition() -> None:
    # The check above means something only if promtool does fail on a broken exposition.
    broken = promtool_check(b"# TYPE x counter\nx_total{a=\"1\" 2\n")
    assert broken.returncode != 0


# A real Prometheus scraping a real daemon ------------------------------------------------


@contextmanager
def prometheus(tmp: Path, targets: dict[str, tuple[int, str]]) -> Iterator[str]:
    """A Prometheus server scraping each job's ``(port, path)`` on 127.0.0.1 every second; yields its URL."""
    port = free_port()
    jobs = "".join(f"  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n"
                   f"      - targets: ['127.0.0.1:{target}']\n" for job, (target, path) in targets.items())
    config = tmp / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}")
    log = tmp / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen([needs("prometheus"), f"--config.file={config}",
                                    f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _get(f"{url}/-/ready") is not None, 60, lambda: f"Prometheus did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


def poll(ready: Any, timeout: float, message: Any) -> Any:
    """Call ``ready`` until it returns something true (returned), failing with ``message()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message())
        time.sleep(0.2)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector ``promql`` evaluates to, through Prometheus's HTTP API."""
    raw = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if raw is None:
        return []
    answer = json.loads(raw)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_a_live_daemon_passes_promtool_and_prometheus_reads_it_back(model_path: Path, tmp_path: Path) -> None:
    with running(tmp_path) as server:
        port = server.server_address[1]
        # The same registry in the text format, whatever the scraper asks: Prometheus reads both.
        server.app.router.add("GET", "/metrics-text", lambda request: request.handler.send_bytes(
            200, request.handler.app.ops.metrics.exposition("text/plain")[0], TEXT_CONTENT_TYPE))
        create_model(port, model_path, "smol", parameters={"num_thread": 1})
        hello = [{"role": "user", "content": "Say hi"}]
        with ollama.Client(host=f"http://127.0.0.1:{port}", timeout=120) as client:
            chats = [client.chat(model="smol", messages=hello, options={"num_predict": 4, "temperature": 0})
                     for _ in range(2)]
            model = client.ps().models[0].model
        with openai_client(server, 120) as sdk:
            completion = sdk.chat.completions.create(model="smol", messages=hello, max_tokens=4, temperature=0)
        message = anthropic_client(server, 120).messages.create(model="smol", max_tokens=4, messages=hello)
        generated = {"ollama": sum(chat.eval_count for chat in chats), "openai": completion.usage.completion_tokens,
                     "anthropic": message.usage.output_tokens}
        prompt = {"openai": completion.usage.prompt_tokens, "anthropic": message.usage.input_tokens}

        status, live = _get_with(f"http://127.0.0.1:{port}/metrics", "text/plain")
        assert status == TEXT_CONTENT_TYPE
        checked = promtool_check(live)
        assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
        status, openmetrics = _get_with(f"http://127.0.0.1:{port}/metrics", PROMETHEUS_ACCEPT)
        assert status == OPENMETRICS_CONTENT_TYPE and openmetrics.endswith(b"\n# EOF\n")

        with prometheus(tmp_path, {"openmetrics": (port, "/metrics"), "text": (port, "/metrics-text")}) as url:
            for job in ("openmetrics", "text"):
                poll(lambda: query(url, f'up{{job="{job}"}} == 1'), 60,
                     lambda: f"the {job} job is not up: {_get(url + '/api/v1/targets')!r}")

                def value(promql: str) -> float:
                    found = poll(lambda: query(url, promql), 30, lambda: f"no value for {promql}")
                    return float(found[0]["value"][1])

                for api, route, count in (("ollama", "/api/chat", 2), ("openai", "/v1/chat/completions", 1),
                                          ("anthropic", "/v1/messages", 1)):
                    assert value(f'mullama_requests_total{{job="{job}",api="{api}",route="{route}",'
                                 f'model="{model}",status="200",key=""}}') == count
                    assert value(f'mullama_generated_tokens_total{{job="{job}",api="{api}",model="{model}"}}') == \
                        generated[api]
                    assert value(f'mullama_time_to_first_token_seconds_count{{job="{job}",api="{api}"}}') == count
                for api, tokens in prompt.items():
                    assert value(f'mullama_prompt_tokens_total{{job="{job}",api="{api}",model="{model}"}}') == tokens
                assert value(f'mullama_requests_total{{job="{job}",route="/api/create",status="200"}}') == 1
                assert value(f'mullama_model_loads_total{{job="{job}",model="{model}",outcome="ok"}}') == 1
                assert value(f'mullama_model_load_duration_seconds_count{{job="{job}",model="{model}"}}') == 1
                assert value(f'mullama_time_per_output_token_seconds_count{{job="{job}",model="{model}"}}') > 0
                assert value(f'mullama_queue_wait_seconds_count{{job="{job}",model="{model}"}}') == 4
                assert value(f'mullama_loaded_models{{job="{job}"}}') == 1
                assert value(f'mullama_model_memory_bytes{{job="{job}",model="{model}"}}') > 1_000_000
                assert value(f'mullama_slots_free{{job="{job}",model="{model}"}}') >= 1
                assert value(f'mullama_kv_cache_used_tokens{{job="{job}",model="{model}"}}') > 0
                assert value(f'process_resident_memory_bytes{{job="{job}"}}') > 10_000_000
                commit = loader.load().manifest.get("llama_cpp_commit")
                assert value(f'mullama_build_info{{job="{job}",llama_cpp_commit="{commit}"}}') == 1
                # A histogram Prometheus can take a quantile of: the buckets arrived whole.
                assert value(f'histogram_quantile(0.5, mullama_request_duration_seconds_bucket{{job="{job}"}})') > 0


def _get_with(url: str, accept: str) -> tuple[str, bytes]:
    """GET ``url`` asking for ``accept``: the answer's content type and body."""
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["Content-Type"], response.read()
