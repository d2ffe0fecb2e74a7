"""Ollama's environment variables: each has a row in the README saying what Mullama does, and each honoured one works.

``tests/data/ollama_envconfig.txt`` is Ollama's list (its ``envconfig``),
kept as data; the README's table must name every variable in it, say
"honoured" or "not applicable" and why, and agree with
:data:`mullama.config.NOT_APPLICABLE`, which the daemon warns about.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import REPO, cli, create_model, environment, exchange, free_port, running, serve
from hub_server import HubServer
from mullama import config
from mullama.client import parse_host
from mullama.config import SettingError
from mullama.engine import memory, probe
from mullama.engine.model import Model
from mullama.engine.residency import MODELS_PER_GPU, automatic_context, default_options
from mullama.errors import ModelLoadError
from mullama.http.app import pin_models
from mullama.http.server import parse_address
from mullama.ops.logs import TRACE, log_level
from mullama.store.blobs import Store
from mullama.store.sweep import sweep

OLLAMA_LIST = Path(__file__).parent / "data" / "ollama_envconfig.txt"
SHORT = {"num_predict": 1, "temperature": 0}


def ollama_variables() -> dict[str, str]:
    """Ollama's variables and their meaning, from the data file."""
    rows = [line.split("\t") for line in OLLAMA_LIST.read_text().splitlines() if line and not line.startswith("#")]
    assert all(len(row) == 2 and row[1] for row in rows), "each line: NAME<TAB>meaning"
    return {name: meaning for name, meaning in rows}


def readme_rows() -> dict[str, str]:
    """The README's table of Ollama's variables: each variable named in a row's first cell, to its last cell."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Ollama's variables", 1)[1].split("\n#", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or set(cells[0]) <= set("- "):
            continue
        for name in re.findall(r"`([A-Za-z_]+)`", cells[0]):
            rows[name] = cells[2]
    return rows


def test_every_ollama_variable_has_a_readme_row_saying_what_mullama_does() -> None:
    variables, rows = ollama_variables(), readme_rows()
    assert len(variables) >= 40
    assert sorted(set(variables) - set(rows)) == [], "variables of Ollama missing from the README's table"
    assert sorted(set(rows) - set(variables)) == [], "rows for variables Ollama does not have"
    for name, what in rows.items():
        assert re.match(r"(honoured|not applicable)\b.{20,}", what), f"{name}: {what!r}"
    not_applicable = {name for name, what in rows.items() if what.startswith("not applicable")}
    assert not_applicable == set(config.NOT_APPLICABLE), "the README and mullama.config disagree"


# --- reading the environment ------------------------------------------------


def test_mullama_first_then_ollama_trimmed_as_ollama_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULLAMA_NUM_PARALLEL", raising=False)
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", ' "3" ')
    assert config.env("NUM_PARALLEL") == "3" and config.source("NUM_PARALLEL") == "OLLAMA_NUM_PARALLEL"
    monkeypatch.setenv("MULLAMA_NUM_PARALLEL", "2")
    assert config.env("NUM_PARALLEL") == "2" and config.source("NUM_PARALLEL") == "MULLAMA_NUM_PARALLEL"


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("yes", True), ("anything", True), ("0", False), ("false", False), ("F", False),
    ("FALSE", False), ("'0'", False), ("", False)])
def test_flags_read_as_ollama_reads_them(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.delenv("MULLAMA_NOPRUNE", raising=False)
    monkeypatch.setenv("OLLAMA_NOPRUNE", value)
    assert config.flag("NOPRUNE") is expected


@pytest.mark.parametrize(("value", "level"), [
    (None, logging.INFO), ("1", logging.DEBUG), ("true", logging.DEBUG), ("2", TRACE), ("0", logging.INFO),
    ("false", logging.INFO), ("-1", logging.WARNING), ("junk", logging.INFO)])
def test_debug_levels_are_ollamas(monkeypatch: pytest.MonkeyPatch, value: str | None, level: int) -> None:
    monkeypatch.delenv("MULLAMA_DEBUG", raising=False)
    if value is None:
        monkeypatch.delenv("OLLAMA_DEBUG", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_DEBUG", value)
    assert log_level() == level


def test_ollamas_default_context_rule() -> None:
    gib = 1 << 30
    assert [automatic_context(size) for size in (0, 8 * gib, 23 * gib - 1, 23 * gib, 46 * gib, 47 * gib, 141 * gib)] \
        == [4096, 4096, 4096, 32768, 32768, 262144, 262144]


def test_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONTEXT_LENGTH", "NUM_PARALLEL", "FLASH_ATTENTION", "KV_CACHE_TYPE", "GPU_OVERHEAD"):
        monkeypatch.delenv(f"MULLAMA_{name}", raising=False)
        monkeypatch.delenv(f"OLLAMA_{name}", raising=False)
    plain = default_options()
    assert plain.num_ctx == automatic_context(memory.gpu_memory()) and plain.num_parallel == 1
    assert plain.flash_attention is None and plain.kv_cache_type == "f16"
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "1536")
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "3")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "false")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "Q8_0")
    set_ = default_options()
    assert (set_.num_ctx, set_.num_parallel, set_.flash_attention, set_.kv_cache_type) == (1536, 3, False, "q8_0")


@pytest.mark.parametrize(("name", "value"), [
    ("OLLAMA_CONTEXT_LENGTH", "4k"), ("OLLAMA_NUM_PARALLEL", "-1"), ("OLLAMA_KV_CACHE_TYPE", "q5_1"),
    ("OLLAMA_MAX_LOADED_MODELS", "three"), ("OLLAMA_MAX_QUEUE", "1.5"), ("OLLAMA_KEEP_ALIVE", "forever"),
    ("OLLAMA_LOAD_TIMEOUT", "soon"), ("OLLAMA_GPU_OVERHEAD", "lots"), ("OLLAMA_HOST", "127.0.0.1:port"),
    ("MULLAMA_MAX_CONTEXT", "big"), ("MULLAMA_MAX_MEMORY", "lots")])
def test_a_value_that_does_not_parse_stops_the_daemon_naming_the_variable(
        tmp_path: Path, name: str, value: str) -> None:
    # The daemon's own address only where the host is the setting tested (it stops before listening).
    address = None if name == "OLLAMA_HOST" else "127.0.0.1:0"
    with pytest.raises(SettingError) as refused, running(tmp_path, address, **{name: value}):  # type: ignore[arg-type]
        pass
    assert refused.value.message.startswith(f"{name}={value!r} is not valid"), refused.value.message


def test_a_bad_value_is_one_line_from_mullama_serve(tmp_path: Path) -> None:
    env = environment(tmp_path, free_port()) | {"OLLAMA_KEEP_ALIVE": "a while"}
    done = subprocess.run([sys.executable, "-m", "mullama", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stderr.splitlines()) == (1, ["Error: OLLAMA_KEEP_ALIVE='a while' is not valid"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["", "http://", "https://", "HTTP://"]),
       st.sampled_from(["", "127.0.0.1", "0.0.0.0", "[::1]", "example.com", "localhost"]),
       st.sampled_from(["", ":0", ":80", ":11435", ":65535"]), st.sampled_from(["", "/x"]))
def test_the_daemon_listens_where_the_cli_connects(scheme: str, host: str, port: str, path: str) -> None:
    text = f"{scheme}{host}{port}{path}"
    listen_host, listen_port = parse_address(text)
    client = parse_host(text)
    assert listen_port == client.port, text
    assert listen_host == client.host or (host == "" and listen_host == "0.0.0.0"), text


def test_noprune_keeps_unreferenced_blobs_and_false_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULLAMA_NOPRUNE", raising=False)
    store = Store(tmp_path / "store")
    orphan = store.root / "blobs" / ("sha256-" + "a" * 64)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    monkeypatch.setenv("OLLAMA_NOPRUNE", "1")
    assert sweep(store).kept_blobs == "OLLAMA_NOPRUNE is set" and orphan.exists()
    monkeypatch.setenv("OLLAMA_NOPRUNE", "false")
    assert sweep(store).unreferenced == 1 and not orphan.exists()


# --- with a daemon ------------------------------------------------------------


def chat(port: int, model: str, **fields: Any) -> dict[str, Any]:
    """One short, non-streamed /api/chat to the daemon on ``port``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/chat", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                         "options": SHORT, **fields}).encode())
    with urllib.request.urlopen(request, timeout=180) as answer:
        return json.loads(answer.read())


def running_models(port: int) -> list[dict[str, Any]]:
    """What /api/ps lists."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ps", timeout=60) as answer:
        return json.loads(answer.read())["models"]


def test_max_loaded_models_evicts_and_defaults_to_ollamas(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path / "default") as server:
        assert server.app.manager.max_loaded == MODELS_PER_GPU * max(1, memory.gpu_count())
    with running(tmp_path / "one", OLLAMA_MAX_LOADED_MODELS="1") as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        create_model(port, model_path, "other", parameters={"temperature": 0})
        chat(port, "smol")
        assert [m["name"] for m in running_models(port)] == ["smol:latest"]
        chat(port, "other")
        assert [m["name"] for m in running_models(port)] == ["other:latest"]


def test_context_length_kv_cache_type_and_flash_attention_reach_the_loaded_model(
        tmp_path: Path, model_path: Path) -> None:
    kv_cache = {}
    for kind, env in (("f16", {}), ("q8_0", {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"})):
        with running(tmp_path / kind, OLLAMA_CONTEXT_LENGTH="1536", **env) as server:
            port = server.server_address[1]
            create_model(port, model_path, "smol")
            chat(port, "smol")
            [loaded] = running_models(port)
            assert loaded["context_length"] == 1536
            kv_cache[kind] = loaded["memory"]["kv_cache"]
            [model] = server.app.manager.running()
            assert model.load_options.kv_cache_type == kind
            assert model.load_options.flash_attention is (True if env else None)
            # A request's num_ctx still wins, and one longer than the model was trained with is cut to that.
            chat(port, "smol", options={**SHORT, "num_ctx": 100000})
            assert [m["context_length"] for m in running_models(port)] == [8192]
    # q8_0 takes 34 bytes per 32 values where f16 takes 64.
    assert kv_cache["q8_0"] * 64 == kv_cache["f16"] * 34


def test_pinned_models_stay_loaded_whatever_requests_say(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        pin_models(server.app.manager, ["smol"])
        [loaded] = running_models(port)
        assert loaded["name"] == "smol:latest" and loaded["expires_at"].startswith("2318")
        assert loaded["limits"] == {"pinned": True}
        chat(port, "smol", keep_alive=0)
        chat(port, "smol", keep_alive="1s")
        assert [m["name"] for m in running_models(port)] == ["smol:latest"]
        status, _ = exchange(server, "POST", "/api/generate", {"model": "smol", "keep_alive": 0})
        assert status == 200 and running_models(port) == []


def test_serve_model_loads_and_pins_before_answering(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        create_model(port, model_path, "other", parameters={"temperature": 0})
    port = free_port()
    env = environment(tmp_path, port) | {"OLLAMA_CONTEXT_LENGTH": "1024", "OLLAMA_REMOTES": "ollama.com"}
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "mullama", "serve", "--model", "smol", "--model", "other"],
                                   env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        first = wait_for_ps(port, process, log)
        assert sorted((m["name"], m["context_length"], m["expires_at"][:4]) for m in first) == [
            ("other:latest", 1024, "2318"), ("smol:latest", 1024, "2318")]
        chat(port, "smol", keep_alive=0)
        assert len(running_models(port)) == 2
        text = log.read_text()
        assert "OLLAMA_REMOTES is set but has no effect on Mullama" in text
        assert "settings: num_ctx 1024, num_parallel 1," in text and "keep_alive 300s, load timeout 300s" in text
    finally:
        process.terminate()
        process.wait(30)


def test_serve_model_that_cannot_be_had_stops_startup(tmp_path: Path) -> None:
    env = environment(tmp_path, free_port()) | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", "hf:nobody/nothing"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) >= 1
    assert done.stderr.splitlines()[-1].startswith("Error: ") and "nobody/nothing" in done.stderr, done.stderr


def wait_for_ps(port: int, process: subprocess.Popen[bytes], log: Path) -> list[dict[str, Any]]:
    """The first /api/ps the daemon answers."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mullama serve exited: {log.read_text()[-2000:]}")
        try:
            return running_models(port)
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"mullama serve did not answer: {log.read_text()[-2000:]}")


#: Stops the process it starts in when that is a probe child (a model's first load), so its load makes no progress.
STOP_THE_PROBE = """
import os, signal, sys
if "mullama.engine.probe" in sys.orig_argv:
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_first_load_whose_child_stalls_is_killed(tmp_path: Path, model_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe._probe([model_path], 300) == (True, "")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_THE_PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    # The child is stopped, so it never reports progress: after the timeout it is killed, whatever the machine's speed.
    ok, message = probe._probe([model_path], 1.0)
    assert ok is None and message.endswith("made no progress for 1s, so it was given up "
                                           "(MULLAMA_LOAD_TIMEOUT/OLLAMA_LOAD_TIMEOUT)"), message


def test_a_load_that_stalls_longer_than_the_load_timeout_is_given_up(tmp_path: Path, model_path: Path) -> None:
    # Any pause between llama.cpp's progress reports is longer than a nanosecond: the load stalls at once.
    with pytest.raises(ModelLoadError, match="made no progress for 1e-09s"):
        Model(model_path, num_ctx=256, stall_timeout=1e-9)
    with Model(model_path, num_ctx=256, stall_timeout=300) as model:
        assert model.n_vocab > 0
    with running(tmp_path / "daemon", OLLAMA_LOAD_TIMEOUT="1ns") as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        status, body = exchange(server, "POST", "/api/chat", {"model": "smol", "stream": False,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 500 and "made no progress" in json.loads(body)["error"]
        assert running_models(port) == []


class _Proxy(BaseHTTPRequestHandler):
    """An HTTP proxy that forwards every request to one server and records the URLs it was asked for."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    seen: list[str]

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self._forward()

    def _forward(self) -> None:
        self.seen.append(self.path)
        target = urlsplit(self.path)
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in ("proxy-connection",)}
        connection.request(self.command, target.path + (f"?{target.query}" if target.query else ""), headers=headers)
        answer = connection.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else
                                               answer.getheader("Content-Length") or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        connection.close()


def test_pulls_go_through_the_proxy_the_environment_names(tmp_path: Path, model_path: Path) -> None:
    with HubServer() as hub:
        hub.add("someone/SmolLM2-135M-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", model_path)
        host, port = urlsplit(hub.endpoint).hostname, urlsplit(hub.endpoint).port
        handler = type("Proxy", (_Proxy,), {"upstream": (host, port), "seen": []})
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            # hub.invalid resolves nowhere: only a pull through the proxy reaches the Hub.
            daemon = serve(tmp_path, HF_ENDPOINT="http://hub.invalid", HF_HUB_OFFLINE="0",
                           HTTP_PROXY=f"http://127.0.0.1:{proxy.server_address[1]}", NO_PROXY="127.0.0.1,localhost")
            try:
                pulled = cli(daemon.env, "pull", "hf.co/someone/SmolLM2-135M-GGUF:q4_1")
            finally:
                daemon.stop()
        finally:
            proxy.shutdown()
            proxy.server_close()
    assert pulled.returncode == 0, pulled.stderr
    assert any(url.startswith("http://hub.invalid/someone/SmolLM2-135M-GGUF/resolve/") for url in handler.seen), \
        handler.seen


def origin_status(port: int, origin: str) -> int:
    """The status of a GET /api/tags sent from a page at ``origin``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/api/tags", headers={"Origin": origin})
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def test_keep_alive_num_parallel_and_origins_from_ollamas_variables(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path / "plain") as server:
        port = server.server_address[1]
        assert origin_status(port, "https://app.example.com") == 403
    with running(tmp_path / "set", OLLAMA_KEEP_ALIVE="-1", OLLAMA_NUM_PARALLEL="2",
                 OLLAMA_ORIGINS="https://*.example.com") as server:
        port = server.server_address[1]
        assert origin_status(port, "https://app.example.com") == 200
        create_model(port, model_path, "smol")
        chat(port, "smol")
        [loaded] = running_models(port)
        assert (loaded["num_parallel"], loaded["expires_at"][:4]) == (2, "2318")


def test_an_automatic_context_steps_down_until_the_model_fits(tmp_path: Path, model_path: Path) -> None:
    # The test model (two layers) is estimated at 136 MiB with 4096 tokens of context and 142 MiB with 8192.
    with running(tmp_path, MULLAMA_MAX_MEMORY="139MiB") as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        create_model(port, model_path, "wide", parameters={"num_ctx": 8192})
        manager = server.app.manager
        # As on a machine with 47 GiB of GPU memory: 262144 tokens, cut to the 8192 SmolLM2 was trained with,
        # which does not fit in 139 MiB, and so 4096.
        manager.defaults = replace(manager.defaults, num_ctx=automatic_context(47 << 30))
        assert manager.resolve("smol").options.num_ctx == 4096
        # A context the Modelfile or the request sets is not automatic: it is kept (and refused if it cannot fit).
        assert manager.resolve("wide").options.num_ctx == 8192
        assert manager.resolve("smol", {"num_ctx": 8192}).options.num_ctx == 8192
    with running(tmp_path / "roomy", MULLAMA_MAX_MEMORY="8GiB") as server:
        manager = server.app.manager
        create_model(server.server_address[1], model_path, "smol")
        manager.defaults = replace(manager.defaults, num_ctx=automatic_context(47 << 30))
        assert manager.resolve("smol").options.num_ctx == 8192
