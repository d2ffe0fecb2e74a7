#!/usr/bin/env python3
"""Mullama's daemon against llama-server, same GGUF, threads and slots, in one run.

    python build_native.py --with-tools      # once: llama-server from the same llama.cpp source
    python bench/serve.py [--model PATH|fast] [--threads N] [--slots 8] [--tokens 64] [--requests 4]
                          [--backend-sampling] [--json]

Both servers get the same load through the same OpenAI-compatible streaming
endpoint, interleaved run by run: streaming chat at concurrency 1, 4 and 8,
each stream asking ``--requests`` questions in turn (aggregate generated
tokens/s, time to first token p50/p95), a chat that
grows for 10 turns (TTFT per turn), and embeddings (inputs/s). Every run asks
new questions (only the system prompt is shared, as with new users), and an
unrecorded first round warms both servers up. Prints a table and the ratios
(Mullama / llama-server; for TTFT, llama-server / Mullama, so that above 1.0
always means Mullama is better), medians over ``--rounds``. On Linux each
concurrency run also records the server process's CPU time per generated
token (``cN_cpu_ms``, user + system, every thread): a figure that other work
on a shared machine moves far less than throughput. ``--model fast``
is the test model cut to two layers (tests/fast_model.py), whose short
decode step shows each server's own work per token, as on a GPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402

QUESTIONS = [
    "Explain how a refrigerator works.", "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?", "Describe the water cycle in detail.",
    "How do vaccines train the immune system?", "Give me a recipe for a vegetable soup.",
    "Why do leaves change colour in autumn?", "Explain recursion to a new programmer.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One server under test, reached over its OpenAI-compatible API."""

    name: str
    port: int
    model: str
    process: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def post(self, path: str, body: dict, stream: bool = False) -> tuple[float | None, int, dict]:
        """POST and read the whole answer; return (TTFT seconds, generated tokens, last JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        started = time.perf_counter()
        conn.request("POST", path, json.dumps({**body, **self.extra}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.name} {path}: HTTP {response.status}: {response.read()[:300]!r}")
        if not stream:
            return None, 0, json.loads(response.read())
        first, last, tokens = None, {}, 0
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            last = chunk
        conn.close()
        return first, tokens, last

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            try:
                self.post("/v1/chat/completions", {"model": self.model, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "hi"}]})
                return
            except (OSError, RuntimeError):
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


def start_mullama(model: Path, threads: int, slots: int, ctx: int, home: Path) -> Server:
    """A daemon serving ``model`` as the model ``bench``, made by ``/api/create`` from its path."""
    port = free_port()
    env = {**os.environ, "MULLAMA_HOST": f"127.0.0.1:{port}", "MULLAMA_HOME": str(home),
           "MULLAMA_MODELS": str(home / "models"), "MULLAMA_NUM_PARALLEL": str(slots),
           # A request names no server file; /api/create may, from this machine, under these directories.
           "MULLAMA_ALLOWED_DIRS": str(model.resolve().parent)}
    process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=open(home / "mullama.log", "w"))
    server = Server("mullama", port, "bench", process,
                    {"options": {"num_ctx": ctx, "num_thread": threads, "num_parallel": slots,
                                 # llama-server does not penalise repeats by default; Ollama does.
                                 "repeat_penalty": 1.0}})
    deadline = time.monotonic() + 120
    while True:
        try:
            server.post("/api/create", {"model": "bench", "from": str(model.resolve()), "stream": False})
            return server
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                server.stop()
                raise RuntimeError("mullama did not start: see its log") from None
            time.sleep(0.2)


def start_llama_server(exe: Path, model: Path, threads: int, slots: int, ctx: int, log: Path,
                       embeddings: bool = False) -> Server:
    port = free_port()
    command = [str(exe), "-m", str(model), "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", str(slots), "-c", str(ctx * slots), "--no-webui"]
    if embeddings:
        command += ["--embeddings", "--pooling", "mean"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    return Server("llama-server", port, str(model), process)


def cpu_seconds(server: Server) -> float | None:
    """User + system CPU seconds of the server's process so far (Linux), else None."""
    try:
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, AttributeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat_load(server: Server, concurrency: int, tokens: int, tag: str,
              per_stream: int) -> tuple[float, list[float], int]:
    """Aggregate generated tokens/s and the TTFTs of ``concurrency`` simultaneous streams.

    Each stream asks ``per_stream`` questions one after the other, so that
    even concurrency 1 gives several TTFTs to take a median of (one request
    is one sample of a figure that moves by milliseconds). ``tag`` opens
    every question, so that each run asks questions neither server has seen
    (only the chat template's system prompt is shared), as new users do.
    """
    results: list[tuple[float | None, int]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        for n in range(per_stream):
            question = f"[{tag} {n}] {QUESTIONS[(i + n) % len(QUESTIONS)]}"
            body = {"model": server.model, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": question}]}
            ttft, generated, _ = server.post("/v1/chat/completions", body, stream=True)
            with lock:
                results.append((ttft, generated))

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    generated = sum(g for _, g in results)
    return generated / elapsed, [t for t, _ in results if t is not None], generated


def growing_chat(server: Server, turns: int, tokens: int, opening: str) -> tuple[list[float], list[dict]]:
    """TTFT of each turn of one conversation that keeps its history, and the conversation.

    ``opening`` starts a conversation neither server has seen, so that turn 1
    reads its whole prompt (as a new chat does) rather than hitting the cache
    left by the concurrency runs.
    """
    messages: list[dict] = []
    ttfts = []
    for turn in range(turns):
        content = opening if turn == 0 else QUESTIONS[turn % len(QUESTIONS)]
        messages.append({"role": "user", "content": content})
        body = {"model": server.model, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "messages": messages}
        ttft, _, _ = server.post("/v1/chat/completions", body, stream=True)
        ttfts.append(ttft or 0.0)
        answer = server.post("/v1/chat/completions", {**body, "stream": False})[2]
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return ttfts, messages


def embeddings(server: Server, n: int) -> float:
    inputs = [f"{QUESTIONS[i % len(QUESTIONS)]} (variant {i})" for i in range(n)]
    started = time.perf_counter()
    server.post("/v1/embeddings", {"model": server.model, "input": inputs})
    return n / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file, or `fast` for the fast stand-in (default: the test model)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048, help="context per slot")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4, help="questions each stream asks in turn")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--backend-sampling", action="store_true",
                        help="both servers sample in the model's graph (the request field backend_sampling)")
    args = parser.parse_args()
    if args.model is None or args.model == "fast":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import smollm2_path
        from fast_model import fast_model_path

        args.model = fast_model_path() if args.model == "fast" else smollm2_path()
    args.model = Path(args.model)
    exe = loader.load().directory.parent / "bin" / "llama-server"
    if not exe.exists():
        raise SystemExit("llama-server not found: run `python build_native.py --with-tools`")
    table: dict[str, dict[str, list[float]]] = {"mullama": {}, "llama-server": {}}
    #: The last growing chat of each server: with the same greedy sampling both must write the same text.
    chats: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mullama-bench-") as tmp:
        home = Path(tmp)
        servers = [start_mullama(args.model, args.threads, args.slots, args.ctx, home),
                   start_llama_server(exe, args.model, args.threads, args.slots, args.ctx, home / "ls.log")]
        try:
            for server in servers:
                if args.backend_sampling:
                    server.extra["backend_sampling"] = True
                server.wait_ready()
            # Round 0 warms both servers up (first-use costs, page faults) and is not recorded.
            for round_number in range(args.rounds + 1):
                for server in servers:
                    row = table[server.name] if round_number else {}
                    for concurrency in (1, 4, 8):
                        cpu_before = cpu_seconds(server)
                        tps, ttfts, generated = chat_load(server, concurrency, args.tokens,
                                                          f"round {round_number} c{concurrency}", args.requests)
                        cpu_after = cpu_seconds(server)
                        if cpu_before is not None and cpu_after is not None and generated:
                            row.setdefault(f"c{concurrency}_cpu_ms", []).append(
                                1e3 * (cpu_after - cpu_before) / generated)
                        row.setdefault(f"c{concurrency}_tps", []).append(tps)
                        row.setdefault(f"c{concurrency}_ttft_p50", []).append(percentile(ttfts, 0.5))
                        row.setdefault(f"c{concurrency}_ttft_p95", []).append(percentile(ttfts, 0.95))
                    opening = f"Round {round_number}: tell me about the sea."
                    turns, chats[server.name] = growing_chat(server, 10, 32, opening)
                    row.setdefault("turn1_ttft", []).append(turns[0])
                    row.setdefault("turn10_ttft", []).append(turns[-1])
        finally:
            for server in servers:
                server.stop()
        embedders = [start_mullama(args.model, args.threads, args.slots, args.ctx, home),
                     start_llama_server(exe, args.model, args.threads, args.slots, args.ctx, home / "lse.log",
                                        embeddings=True)]
        try:
            for server in embedders:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        embeddings(server, 1)
                        break
                    except (OSError, RuntimeError):
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
            for _ in range(args.rounds):
                for server in embedders:
                    table[server.name].setdefault("embed_per_s", []).append(embeddings(server, 64))
        finally:
            for server in embedders:
                server.stop()
    summary = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in table.items()}
    ours, theirs = summary["mullama"], summary["llama-server"]
    print(f"{'metric':<18}{'mullama':>12}{'llama-server':>14}{'ratio':>8}")
    ratios = {}
    for key in ours:
        better_high = key.endswith("tps") or key.endswith("per_s")
        ratio = ours[key] / theirs[key] if better_high else theirs[key] / ours[key]
        ratios[key] = ratio
        print(f"{key:<18}{ours[key]:>12.3f}{theirs[key]:>14.3f}{ratio:>8.2f}")
    print(f"growing chat: turn 10 TTFT / turn 1 TTFT = {ours['turn10_ttft'] / ours['turn1_ttft']:.2f} (mullama), "
          f"{theirs['turn10_ttft'] / theirs['turn1_ttft']:.2f} (llama-server)")
    same = chats["mullama"] == chats["llama-server"]
    print(f"same greedy text in the 10-turn chat: {'yes' if same else 'NO: the servers did different work'}")
    if args.json:
        print(json.dumps({"mullama": ours, "llama_server": theirs, "ratios": ratios, "same_text": same}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
