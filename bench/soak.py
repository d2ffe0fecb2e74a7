#!/usr/bin/env python3
"""Soak: thousands of mixed requests against one ``mullama serve``; nothing may break, leak or drift.

    python bench/soak.py [--requests 2000] [--concurrency 16] [--max-seconds 900] [--model PATH] [--json]

One daemon (a subprocess, its own store, the SmolLM2-135M test model
uploaded as a blob) gets, from ``--concurrency`` client threads, a shuffled
mix of: the three APIs' generations, streamed and not; embeddings; tool
calls (free and forced); streams the client drops after the first line;
listings; and hostile requests (bad JSON, wrong types, foreign origins,
no-preflight content types, server paths, too many stops, too many JSON
values, broken chunked framing, unknown models). It checks that:

- every answer is a valid response of its API or a well-formed error in
  that API's shape (a cut stream may end with the API's error event);
- the greedy answers (temperature 0) equal those the idle daemon gave, one
  request at a time, before the load (embeddings: within 1e-4);
- after the run, once its connections are closed, the daemon's resident
  memory is within 5% of what it was after an unrecorded warm-up of the
  same mix, and its threads and open file descriptors are back where they
  were (read from ``/proc/PID/status`` and ``/proc/PID/fd``).

Prints the figures (requests, answers by kind and status, RSS, threads and
fds before and after) and exits 1 when a check fails. The run stops early,
and says so, when ``--max-seconds`` pass.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "soak"
#: What every generation of the soak may do: a few tokens, on the daemon's two threads.
PARAMETERS = {"num_ctx": 2048, "num_thread": 2, "num_predict": 8, "temperature": 0}
PROMPTS = ["Why is the sky blue?", "Name three fruits.", "What is 2 + 2?", "Say hello in French.",
           "Write one line about the sea.", "What colour is grass?"]
SYSTEM = "You are a concise assistant."
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
TIMEOUT = 300
#: How much the daemon's resident size may differ after the run from after the warm-up.
RSS_TOLERANCE = 0.05


class Invalid(Exception):
    """An answer that is neither a valid response nor a well-formed error."""


@dataclass
class Answer:
    """An HTTP answer read whole."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise Invalid(f"HTTP {self.status}: not JSON: {self.body[:200]!r}") from None


@dataclass
class Daemon:
    """The daemon under test."""

    port: int
    process: subprocess.Popen[bytes]

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            sent = {"Content-Type": "application/json"} if isinstance(body, (dict, list)) else {}
            connection.request(method, path, data, {**sent, **(headers or {})})
            response = connection.getresponse()
            return Answer(response.status, dict(response.headers), response.read())
        finally:
            connection.close()

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    def figures(self) -> dict[str, int]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return {"rss": int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1]) * 1024,
                "threads": int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)[1]),
                "fds": len(os.listdir(f"/proc/{self.process.pid}/fd"))}


# --- checking answers ---------------------------------------------------------------------------------------


def error_message(api: str, answer: Answer) -> str:
    """The message of a well-formed error of ``api``; raises :class:`Invalid` otherwise."""
    body = answer.json()
    if not answer.headers.get("Content-Type", "").startswith("application/json"):
        raise Invalid(f"HTTP {answer.status} error is not application/json")
    error = body.get("error") if isinstance(body, dict) else None
    if api == "ollama" and isinstance(error, str) and error:
        return error
    if api in ("openai", "anthropic") and isinstance(error, dict) and isinstance(error.get("message"), str):
        if api == "anthropic" and body.get("type") != "error":
            raise Invalid(f"Anthropic error without type error: {body}")
        return error["message"]
    raise Invalid(f"HTTP {answer.status}: not a {api} error: {answer.body[:200]!r}")


def refused(api: str, answer: Answer) -> str:
    """An answer that must be a well-formed 4xx: its outcome label."""
    if not 400 <= answer.status < 500:
        raise Invalid(f"hostile request answered {answer.status}: {answer.body[:200]!r}")
    message = error_message(api, answer)
    if "Traceback" in message or "object has no attribute" in message:
        raise Invalid(f"an internal error leaked: {message}")
    return str(answer.status)


def ndjson(answer: Answer) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in answer.body.splitlines() if line.strip()]
    if not lines or not all(isinstance(line, dict) for line in lines):
        raise Invalid("empty or malformed NDJSON stream")
    if "error" in lines[-1]:
        raise Invalid(f"stream ended with an error: {lines[-1]}")
    if not lines[-1].get("done"):
        raise Invalid("NDJSON stream without its final line")
    return lines


def sse(answer: Answer) -> list[tuple[str, Any]]:
    """(event name, data) of a server-sent event stream; ``[DONE]`` as data None."""
    events, name = [], ""
    for line in answer.body.decode().splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            events.append((name, None if data == "[DONE]" else json.loads(data)))
            name = ""
    if not events:
        raise Invalid("empty event stream")
    for _, data in events:
        if isinstance(data, dict) and ("error" in data and data.get("type") in (None, "error")):
            raise Invalid(f"stream ended with an error: {data}")
    return events


def ok(answer: Answer) -> None:
    if answer.status != 200:
        raise Invalid(f"HTTP {answer.status}: {answer.body[:300]!r}")


# --- the requests -------------------------------------------------------------------------------------------


def _options() -> dict[str, Any]:
    return dict(PARAMETERS)


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def ollama_generate(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/api/generate", {"model": MODEL, "prompt": prompt, "stream": False,
                                                      "options": _options()})
    ok(answer)
    body = answer.json()
    if not body.get("done") or not isinstance(body.get("response"), str):
        raise Invalid(f"generate: {body}")
    return body["response"]


def ollama_chat_stream(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/api/chat", {"model": MODEL, "messages": _chat(prompt), "options": _options()})
    ok(answer)
    return "".join(line["message"]["content"] for line in ndjson(answer))


def openai_chat(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/v1/chat/completions", {"model": MODEL, "messages": _chat(prompt),
                                                             "max_tokens": 8, "temperature": 0})
    ok(answer)
    body = answer.json()
    if body.get("object") != "chat.completion":
        raise Invalid(f"chat completion: {body}")
    return body["choices"][0]["message"]["content"]


def openai_chat_stream(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/v1/chat/completions", {"model": MODEL, "messages": _chat(prompt),
                                                             "max_tokens": 8, "temperature": 0, "stream": True})
    ok(answer)
    events = sse(answer)
    if events[-1][1] is not None:
        raise Invalid("chat completion stream without [DONE]")
    return "".join((e["choices"][0]["delta"].get("content") or "") for _, e in events if e and e.get("choices"))


def openai_completion(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0})
    ok(answer)
    return answer.json()["choices"][0]["text"]


def anthropic_message(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/v1/messages", {"model": MODEL, "system": SYSTEM, "max_tokens": 8,
                                                     "temperature": 0,
                                                     "messages": [{"role": "user", "content": prompt}]})
    ok(answer)
    body = answer.json()
    if body.get("type") != "message":
        raise Invalid(f"message: {body}")
    return "".join(block.get("text", "") for block in body["content"])


def anthropic_stream(daemon: Daemon, prompt: str) -> str:
    answer = daemon.request("POST", "/v1/messages", {"model": MODEL, "system": SYSTEM, "max_tokens": 8,
                                                     "temperature": 0, "stream": True,
                                                     "messages": [{"role": "user", "content": prompt}]})
    ok(answer)
    events = sse(answer)
    if events[-1][0] != "message_stop":
        raise Invalid(f"message stream ends with {events[-1][0]}")
    return "".join(data["delta"].get("text", "") for name, data in events if name == "content_block_delta")


GREEDY: dict[str, Callable[[Daemon, str], str]] = {
    "ollama generate": ollama_generate, "ollama chat stream": ollama_chat_stream, "openai chat": openai_chat,
    "openai chat stream": openai_chat_stream, "openai completion": openai_completion,
    "anthropic message": anthropic_message, "anthropic stream": anthropic_stream,
}


def ollama_embed(daemon: Daemon, texts: list[str]) -> list[list[float]]:
    answer = daemon.request("POST", "/api/embed", {"model": MODEL, "input": texts})
    ok(answer)
    vectors = answer.json()["embeddings"]
    if len(vectors) != len(texts):
        raise Invalid("embed: wrong number of vectors")
    return vectors


def openai_embed(daemon: Daemon, texts: list[str]) -> list[list[float]]:
    answer = daemon.request("POST", "/v1/embeddings", {"model": MODEL, "input": texts})
    ok(answer)
    return [item["embedding"] for item in answer.json()["data"]]


def tools_ollama(daemon: Daemon, rng: random.Random) -> str:
    answer = daemon.request("POST", "/api/chat", {
        "model": MODEL, "stream": False, "tools": [TOOL], "options": {**_options(), "num_predict": 24},
        "messages": [{"role": "user", "content": f"What is the weather in {rng.choice(['Paris', 'Oslo'])}?"}]})
    ok(answer)
    message = answer.json()["message"]
    for call in message.get("tool_calls") or []:
        if not isinstance(call["function"]["arguments"], dict):
            raise Invalid(f"tool call arguments: {call}")
    return "ok"


def tools_openai_forced(daemon: Daemon, rng: random.Random) -> str:
    answer = daemon.request("POST", "/v1/chat/completions", {
        "model": MODEL, "tools": [TOOL], "tool_choice": "required", "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": f"Weather in {rng.choice(['Rome', 'Lima'])}?"}]})
    ok(answer)
    choice = answer.json()["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    if choice["finish_reason"] == "tool_calls":
        for call in calls:
            json.loads(call["function"]["arguments"])
    return "ok"


def dropped_stream(daemon: Daemon, rng: random.Random) -> str:
    """A client that reads the first line of a stream and leaves."""
    path, body = rng.choice([
        ("/api/generate", {"model": MODEL, "prompt": "Count to fifty.", "options": {**_options(), "num_predict": 64}}),
        ("/v1/chat/completions", {"model": MODEL, "stream": True, "max_tokens": 64,
                                  "messages": [{"role": "user", "content": "Count to fifty."}]}),
        ("/v1/messages", {"model": MODEL, "stream": True, "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Count to fifty."}]}),
    ])
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=TIMEOUT)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise Invalid(f"stream answered {response.status}")
        if not response.readline():
            raise Invalid("stream without a first line")
    finally:
        connection.close()
    return "dropped"


def listing(daemon: Daemon, rng: random.Random) -> str:
    path = rng.choice(["/api/tags", "/api/ps", "/v1/models", "/api/version", f"/v1/models/{MODEL}"])
    answer = daemon.request("GET", path)
    ok(answer)
    answer.json()
    return "ok"


# Hostile requests: (API whose error shape answers, request). Each must be a well-formed 4xx.
def _hostile_requests(daemon: Daemon) -> list[tuple[str, Callable[[], Answer]]]:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    many_values = b'{"model": "soak", "context": [' + b"[]," * 600_000 + b"[]]}"
    bad_chunk = (b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0x11\r\n" + json.dumps({"model": MODEL}).encode() +
                 b"\r\n0\r\n\r\n")

    def raw_answer(data: bytes) -> Answer:
        received = daemon.raw(data)
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return Answer(int(lines[0].split(" ")[1]), headers, body)

    post = daemon.request
    return [
        ("ollama", lambda: post("POST", "/api/chat", b"{not json", {"Content-Type": "application/json"})),
        ("ollama", lambda: post("POST", "/api/generate", {"model": MODEL, "prompt": ["a list"]})),
        ("ollama", lambda: post("POST", "/api/chat", {**chat, "messages": "not a list"})),
        ("ollama", lambda: post("POST", "/api/create", {"model": "x", "from": MODEL, "system": "pwned"},
                                {"Origin": "https://evil.example", "Content-Type": "text/plain"})),
        ("ollama", lambda: post("POST", "/api/show", {"model": MODEL},
                                {"Origin": "http://localhost:3000", "Content-Type": "text/plain"})),
        ("ollama", lambda: post("POST", "/api/show", {"model": "/etc/passwd"})),
        ("ollama", lambda: post("POST", "/api/generate", {"model": "zz-missing", "prompt": "hi"})),
        ("ollama", lambda: post("POST", "/api/generate", {"model": MODEL, "prompt": "hi",
                                                          "options": {"stop": ["x"] * 100}})),
        ("ollama", lambda: post("POST", "/api/chat", many_values, {"Content-Type": "application/json"})),
        ("ollama", lambda: post("POST", "/api/chat", b"[" * 100_000, {"Content-Type": "application/json"})),
        ("ollama", lambda: raw_answer(bad_chunk)),
        ("ollama", lambda: post("POST", "/api/blobs/sha256:" + "0" * 64, b"not those bytes",
                                {"Content-Type": "application/octet-stream"})),
        ("openai", lambda: post("POST", "/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 0})),
        ("openai", lambda: post("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": 5}]})),
        ("openai", lambda: post("POST", "/v1/embeddings", {"model": MODEL, "input": [[1, 2], {"a": 1}]})),
        ("openai", lambda: post("POST", "/v1/chat/completions", {**chat, "response_format": {"type": "bogus"}})),
        ("anthropic", lambda: post("POST", "/v1/messages", {"model": MODEL, "messages": "hi"})),
        ("anthropic", lambda: post("POST", "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "@@"}}]}]})),
        ("anthropic", lambda: post("POST", "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "user", "content": "hi"}], "stop_sequences": ["y" * 5000]})),
    ]


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the requests of a run came to."""

    outcomes: Counter[str] = field(default_factory=Counter)
    invalid: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, label: str) -> None:
        with self.lock:
            self.outcomes[label] += 1

    def fail(self, label: str, reason: str) -> None:
        with self.lock:
            self.outcomes[f"{label}: INVALID"] += 1
            self.invalid.append(f"{label}: {reason}")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b))


def one_request(daemon: Daemon, rng: random.Random, references: dict[str, Any], tally: Tally) -> None:
    """Send one request of a randomly drawn kind and hold its answer to the contract."""
    roll = rng.random()
    label = "?"
    try:
        if roll < 0.42:
            label = rng.choice(sorted(GREEDY))
            prompt = rng.choice(PROMPTS)
            text = GREEDY[label](daemon, prompt)
            if text != references[label][prompt]:
                with tally.lock:
                    tally.drift.append(f"{label} {prompt!r}: {text!r} != idle {references[label][prompt]!r}")
                tally.add(f"{label}: DRIFT")
                return
            tally.add(f"{label}: 200")
        elif roll < 0.54:
            label = rng.choice(["ollama embed", "openai embeddings"])
            texts = rng.sample(PROMPTS, 2)
            vectors = (ollama_embed if label == "ollama embed" else openai_embed)(daemon, texts)
            if not all(_close(v, references["embed"][t]) for v, t in zip(vectors, texts)):
                with tally.lock:
                    tally.drift.append(f"{label}: vectors differ from the idle daemon's")
                tally.add(f"{label}: DRIFT")
                return
            tally.add(f"{label}: 200")
        elif roll < 0.62:
            label = rng.choice(["tools ollama", "tools openai forced"])
            (tools_ollama if label == "tools ollama" else tools_openai_forced)(daemon, rng)
            tally.add(f"{label}: 200")
        elif roll < 0.72:
            label = "dropped stream"
            tally.add(f"{label}: {dropped_stream(daemon, rng)}")
        elif roll < 0.78:
            label = "listing"
            listing(daemon, rng)
            tally.add(f"{label}: 200")
        else:
            api, send = rng.choice(_hostile_requests(daemon))
            label = f"hostile {api}"
            tally.add(f"{label}: {refused(api, send())}")
    except Invalid as error:
        tally.fail(label, str(error))
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, IndexError) as error:
        tally.fail(label, f"{type(error).__name__}: {error}")


def run(daemon: Daemon, count: int, concurrency: int, seed: int, references: dict[str, Any], tally: Tally,
        deadline: float) -> int:
    """``count`` requests from ``concurrency`` threads; returns how many were sent before ``deadline``."""
    sent = Counter[str]()
    lock = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            with lock:
                if sent["n"] >= count or time.monotonic() > deadline:
                    return
                sent["n"] += 1
            one_request(daemon, rng, references, tally)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, i) for i in range(concurrency)]:
            future.result()
    return sent["n"]


def settled(daemon: Daemon, baseline: dict[str, int] | None = None, wait: float = 15.0) -> dict[str, int]:
    """The daemon's figures once its threads stop changing (connections closed), or reach ``baseline``'s."""
    deadline = time.monotonic() + wait
    last = daemon.figures()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = daemon.figures()
        if baseline is not None and now["threads"] <= baseline["threads"] and now["fds"] <= baseline["fds"]:
            return now
        if baseline is None and now["threads"] == last["threads"] and now["fds"] == last["fds"]:
            return now
        last = now
    return daemon.figures()


def start(home: Path, model: Path) -> Daemon:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MULLAMA_", "OLLAMA_"))}
    env |= {"MULLAMA_HOST": f"127.0.0.1:{port}", "MULLAMA_HOME": str(home), "MULLAMA_MODELS": str(home / "models"),
            "OLLAMA_MODELS": str(home / "ollama"), "MULLAMA_NUM_PARALLEL": "4", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (home / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    daemon = Daemon(port, process)
    for _ in range(600):
        try:
            if daemon.request("GET", "/").status == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise SystemExit(f"mullama serve did not start: {(home / 'serve.log').read_text()[-2000:]}")
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    with model.open("rb") as upload:
        answer = daemon.request("POST", f"/api/blobs/{digest}", upload,
                                {"Content-Type": "application/octet-stream", "Content-Length": str(model.stat().st_size)})
    if answer.status not in (200, 201):
        raise SystemExit(f"upload failed: {answer.status} {answer.body[:200]!r}")
    answer = daemon.request("POST", "/api/create", {"model": MODEL, "files": {model.name: digest}, "stream": False,
                                                    "parameters": PARAMETERS})
    if answer.status != 200:
        raise SystemExit(f"create failed: {answer.status} {answer.body[:200]!r}")
    return daemon


def references_of(daemon: Daemon) -> dict[str, Any]:
    """The idle daemon's answers, one request at a time."""
    references: dict[str, Any] = {label: {p: send(daemon, p) for p in PROMPTS} for label, send in GREEDY.items()}
    references["embed"] = dict(zip(PROMPTS, ollama_embed(daemon, PROMPTS)))
    return references


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=600, help="unrecorded requests of the same mix first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the SmolLM2-135M test model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import smollm2_path

        args.model = smollm2_path()
    with tempfile.TemporaryDirectory(prefix="mullama-soak-") as tmp:
        daemon = start(Path(tmp), args.model)
        try:
            references = references_of(daemon)
            warm = Tally()
            run(daemon, args.warmup, args.concurrency, args.seed + 1, references, warm, time.monotonic() + 600)
            before = settled(daemon)
            tally = Tally()
            started = time.monotonic()
            sent = run(daemon, args.requests, args.concurrency, args.seed, references, tally,
                       started + args.max_seconds)
            seconds = time.monotonic() - started
            after = settled(daemon, before)
            alive = daemon.process.poll() is None
        finally:
            daemon.process.terminate()
            try:
                daemon.process.wait(30)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
        log_tail = (Path(tmp) / "serve.log").read_text(errors="replace")[-3000:]
    growth = (after["rss"] - before["rss"]) / before["rss"]
    checks = {
        "every answer valid or a well-formed error": not tally.invalid and not warm.invalid,
        "greedy answers equal the idle daemon's": not tally.drift and not warm.drift,
        f"RSS within {RSS_TOLERANCE:.0%} of the warm-up's": abs(growth) <= RSS_TOLERANCE,
        "no thread leak": after["threads"] <= before["threads"],
        "no fd leak": after["fds"] <= before["fds"],
        "daemon alive": alive,
        "all requests sent in time": sent == args.requests,
    }
    report = {"requests": sent, "seconds": round(seconds, 1), "concurrency": args.concurrency,
              "outcomes": dict(sorted(tally.outcomes.items())),
              "rss_before_mib": round(before["rss"] / 2**20, 1), "rss_after_mib": round(after["rss"] / 2**20, 1),
              "rss_change": f"{growth:+.2%}", "threads": [before["threads"], after["threads"]],
              "fds": [before["fds"], after["fds"]], "checks": checks,
              "invalid": (warm.invalid + tally.invalid)[:20], "drift": (warm.drift + tally.drift)[:20]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{sent} requests in {seconds:.0f} s at concurrency {args.concurrency} "
              f"(after {args.warmup} unrecorded warm-up requests)")
        print("answers by kind and status:")
        for label, count in sorted(tally.outcomes.items()):
            print(f"  {label:<36} {count:>5}")
        print(f"RSS     {report['rss_before_mib']} MiB -> {report['rss_after_mib']} MiB ({report['rss_change']})")
        print(f"threads {before['threads']} -> {after['threads']}")
        print(f"fds     {before['fds']} -> {after['fds']}")
        for line in report["invalid"] + report["drift"]:
            print("  !", line)
        for name, passed in checks.items():
            print(f"{'PASS' if passed else 'FAIL'}  {name}")
    if not all(checks.values()):
        print(log_tail, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
