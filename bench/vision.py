#!/usr/bin/env python3
"""Image prompts: Mullama's daemon against ``llama-server --mmproj``, same model, projector, image and threads.

    python build_native.py --with-tools      # once: llama-server from the same llama.cpp source
    python bench/vision.py [--model GGUF --mmproj GGUF --image FILE] [--threads N] [--rounds 5] [--json]

Without ``--model``/``--mmproj`` it uses the test model (SmolLM2-135M) and
the tiny generated test projector (tests/projector.py), whose vision tower
is nearly free: then the figures are about the path around the encoder
(decoding the picture, reading its embeddings, scheduling), not the
encoder. Without ``--image``, the test picture of the pinned llama.cpp
source.

Each round, interleaved server by server, sends through the OpenAI-compatible
streaming chat endpoint: a first turn with the image (time to first token
and total time), then a second turn of the same conversation (its time to
first token: the image is cached, so it should not pay for encoding again).
Every round's image differs in its bytes (a few bytes appended after the
picture, which decoders ignore), so no server can answer from an earlier
round's cache. An unrecorded round warms both up. Ratios are llama-server /
Mullama: above 1.0 means Mullama is faster. ``--mullama-only`` measures
Mullama alone where llama-server has not been built.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import Server, free_port, start_mullama  # noqa: E402

from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402

NAME = "vision-bench"
QUESTION = "Describe this picture."
FOLLOW_UP = "What colours are in it?"


def start_llama_server(exe: Path, model: Path, mmproj: Path, threads: int, ctx: int, log: Path) -> Server:
    port = free_port()
    command = [str(exe), "-m", str(model), "--mmproj", str(mmproj), "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "-np", "1", "-c", str(ctx), "--no-webui"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    return Server("llama-server", port, str(model), process)


def create_vision_model(server: Server, model: Path, mmproj: Path) -> None:
    """Put the model and its projector in the daemon's store, as ``ollama create`` with files does."""
    data = mmproj.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    conn.request("POST", f"/api/blobs/{digest}", data)
    response = conn.getresponse()
    response.read()
    if response.status not in (200, 201):
        raise RuntimeError(f"uploading the projector failed: HTTP {response.status}")
    server.post("/api/create", {"model": NAME, "from": server.model, "files": {"mmproj.gguf": digest},
                                "stream": False})
    server.model = NAME


def turns(server: Server, image: bytes, tokens: int) -> dict[str, float]:
    """A first turn with ``image`` and a second turn about it; their times in seconds."""
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": QUESTION}]}]
    body = {"model": server.model, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, _, last = server.post("/v1/chat/completions", body | {"messages": first}, stream=True)
    total = time.perf_counter() - started
    answer = server.post("/v1/chat/completions", body | {"messages": first, "stream": False})[2]
    second = first + [answer["choices"][0]["message"], {"role": "user", "content": FOLLOW_UP}]
    ttft2, _, _ = server.post("/v1/chat/completions", body | {"messages": second}, stream=True)
    return {"first_ttft": ttft or total, "first_total": total, "second_ttft": ttft2 or 0.0,
            "prompt_tokens": float((last.get("usage") or {}).get("prompt_tokens") or 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="text GGUF (default: the SmolLM2-135M test model)")
    parser.add_argument("--mmproj", type=Path, help="projector GGUF (default: the tiny test projector)")
    parser.add_argument("--image", type=Path, help="picture (default: tools/mtmd/test-1.jpeg of the pinned source)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per turn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mullama-only", action="store_true", help="measure Mullama alone")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    if args.model is None:
        from conftest import smollm2_path

        args.model = smollm2_path()
    if args.mmproj is None:
        from projector import tiny_projector_path

        args.mmproj = tiny_projector_path()
    if args.image is None:
        from conftest import llama_cpp_source

        args.image = llama_cpp_source() / "tools" / "mtmd" / "test-1.jpeg"
    picture = args.image.read_bytes()
    exe = loader.load().directory.parent / "bin" / "llama-server"
    if not args.mullama_only and not exe.exists():
        raise SystemExit("llama-server not found: run `python build_native.py --with-tools` (or use --mullama-only)")
    table: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mullama-bench-vision-") as tmp:
        home = Path(tmp)
        mullama = start_mullama(args.model, args.threads, 1, args.ctx, home)
        servers = [mullama]
        if not args.mullama_only:
            servers.append(start_llama_server(exe, args.model, args.mmproj, args.threads, args.ctx, home / "ls.log"))
        try:
            for server in servers:
                server.wait_ready()
            create_vision_model(mullama, args.model, args.mmproj)
            for round_number in range(args.rounds + 1):
                image = picture + f"mullama bench round {round_number}".encode()
                for server in servers:
                    measured = turns(server, image, args.tokens)
                    if round_number:
                        row = table.setdefault(server.name, {})
                        for key, value in measured.items():
                            row.setdefault(key, []).append(value)
        finally:
            for server in servers:
                server.stop()
    summary = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in table.items()}
    ours, theirs = summary["mullama"], summary.get("llama-server")
    print(f"{'metric (s)':<16}{'mullama':>12}" + (f"{'llama-server':>14}{'ratio':>8}" if theirs else ""))
    ratios = {}
    for key in ("first_ttft", "first_total", "second_ttft"):
        line = f"{key:<16}{ours[key]:>12.4f}"
        if theirs:
            ratios[key] = theirs[key] / ours[key]
            line += f"{theirs[key]:>14.4f}{ratios[key]:>8.2f}"
        print(line)
    print(f"second turn / first turn TTFT: {ours['second_ttft'] / ours['first_ttft']:.2f} (mullama)"
          + (f", {theirs['second_ttft'] / theirs['first_ttft']:.2f} (llama-server)" if theirs else ""))
    print(f"prompt tokens of the first turn: {ours['prompt_tokens']:.0f} (mullama)"
          + (f", {theirs['prompt_tokens']:.0f} (llama-server)" if theirs else ""))
    if args.json:
        print(json.dumps({"mullama": ours, "llama_server": theirs, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
