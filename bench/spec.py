#!/usr/bin/env python3
"""Speculative decoding: what Mullama and llama-server each gain with the same draft model, or n-grams.

    python build_native.py --with-tools      # once: llama-server from the same llama.cpp source
    python bench/spec.py [--threads N] [--tokens 128] [--rounds 3] [--draft-max 3] [--draft-p-min 0] [--json]
    python bench/spec.py --ngram 3 [--draft-max 8] ...

The pair is made from the test model (tests/fast_model.py): the target is
it re-quantized to F16, the draft is the Q4_1 test model itself, so the two
share their vocabulary and mostly agree. Greedy generation of ``--tokens``
tokens for a few prompts, interleaved round by round: the target alone and
the pair in Mullama's engine (``Model(target, draft=...)``, the request
option ``draft`` false for the target alone, ``draft_num_predict`` set to
``--draft-max``), and the same two in llama-server (``--model-draft``,
``--spec-type draft-simple``, ``--spec-draft-n-max``), with each one's
draft acceptance rate. The figure to compare is each one's speed-up (pair
/ target alone). Both draft greedily up to ``--draft-max`` tokens every
step, and stop a draft at a token the draft gives less than
``--draft-p-min`` among its ten likeliest (Mullama's option
``draft_p_min``, llama-server's ``--spec-draft-p-min``; 0, llama-server's
default, never stops early).

With ``--ngram N`` there is no draft model: the Q4_1 test model alone is
asked to repeat or lightly edit a passage, and drafts from its own text
(Mullama's option ``draft_ngram``; llama-server's ``--spec-type
ngram-simple`` with ``--spec-ngram-simple-size-n N`` and ``-size-m`` set to
``--draft-max``); both stop at the end of the answer rather than ignoring it.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from conftest import smollm2_path  # noqa: E402
from fast_model import f16_model_path  # noqa: E402
from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402
from serve import free_port  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
           "Describe the water cycle in detail."]
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: Answers that repeat the prompt's text, where drafting from n-grams pays.
PASSAGE = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock, "
           "and wrote the weather in his logbook. Ships passed far out at sea, and none of them knew his name.")
NGRAM_PROMPTS = [f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
                 f"Rewrite this text in the present tense, changing nothing else:\n\n{PASSAGE}",
                 f"Copy this text, replacing 'lighthouse keeper' with 'old sailor':\n\n{PASSAGE}"]


def start_llama_server(exe: Path, target: Path, spec: list[str], threads: int,
                       log: Path) -> tuple[subprocess.Popen, int]:
    """llama-server with ``target`` and the speculative decoding arguments ``spec`` (none: the target alone)."""
    port = free_port()
    command = [str(exe), "-m", str(target), "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", "1", "-c", "2048", "--no-webui", *spec]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited with {process.returncode}; see {log}")
        try:
            complete(port, "hi", 1, True)
            return process, port
        except (OSError, RuntimeError):
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"llama-server did not start; see {log}")


def complete(port: int, prompt: str, tokens: int, ignore_eos: bool) -> dict:
    """llama-server's /completion, greedy; its answer (with ``timings``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "cache_prompt": False, "ignore_eos": ignore_eos}
    conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    return json.loads(data)


def server_round(port: int, tokens: int, prompts: list[str], ignore_eos: bool) -> tuple[float, int, int]:
    """(decode tokens/s, drafted, accepted) over the prompts."""
    seconds, generated, drafted, accepted = 0.0, 0, 0, 0
    for question in prompts:
        timings = complete(port, CHAT.format(question), tokens, ignore_eos)["timings"]
        seconds += timings["predicted_ms"] / 1000
        generated += timings["predicted_n"]
        drafted += timings.get("draft_n", 0)
        accepted += timings.get("draft_n_accepted", 0)
    return generated / seconds, drafted, accepted


def engine_round(model: mullama.Model, tokens: int, prompts: list[str], options: dict) -> tuple[float, int, int]:
    """(decode tokens/s, drafted, accepted) of Mullama's engine over the prompts, greedy, with ``options``."""
    seconds, generated, drafted, accepted = 0.0, 0, 0, 0
    for question in prompts:
        model.context.forget(0)
        if model.draft is not None:
            model.draft.ctx.forget(0)
        timings = model.complete(CHAT.format(question), dict(options, temperature=0, num_predict=tokens)).timings
        seconds += timings.eval_duration / 1e9
        generated += timings.eval_count
        drafted += timings.draft_proposed
        accepted += timings.draft_accepted
    return generated / seconds, drafted, accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draft-max", type=int, default=3, help="tokens drafted per step (llama-server's default)")
    parser.add_argument("--draft-p-min", type=float, default=0.0,
                        help="stop a draft at a token it is less sure of (llama-server's default: 0, never)")
    parser.add_argument("--ngram", type=int, default=0,
                        help="no draft model: draft from the text itself with n-grams of this size")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    exe = loader.load().directory.parent / "bin" / "llama-server"
    if not exe.exists():
        raise SystemExit("llama-server not found: run `python build_native.py --with-tools`")
    if args.ngram:
        target, draft, prompts, ignore_eos = smollm2_path(), None, NGRAM_PROMPTS, False
        spec = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(args.ngram),
                "--spec-ngram-simple-size-m", str(args.draft_max)]
        drafting = {"draft_ngram": args.ngram, "draft_num_predict": args.draft_max}
    else:
        target, draft, prompts, ignore_eos = f16_model_path(), smollm2_path(), PROMPTS, True
        spec = ["--model-draft", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(args.draft_max),
                "--spec-draft-p-min", str(args.draft_p_min), "-td", str(args.threads)]
        drafting = {"draft_num_predict": args.draft_max, "draft_p_min": args.draft_p_min}
    alone = {"draft": False}
    rows: dict[str, list[float]] = {"mullama_target_tps": [], "mullama_pair_tps": [], "server_target_tps": [],
                                    "server_pair_tps": []}
    counts = {"mullama": [0, 0], "server": [0, 0]}
    with tempfile.TemporaryDirectory(prefix="mullama-spec-") as tmp, \
            mullama.Model(target, num_ctx=2048, num_thread=args.threads, draft=draft) as model:
        servers = {"target": start_llama_server(exe, target, [], args.threads, Path(tmp, "t.log")),
                   "pair": start_llama_server(exe, target, spec, args.threads, Path(tmp, "p.log"))}
        try:
            engine_round(model, 8, prompts, drafting)
            for _, port in servers.values():
                server_round(port, 8, prompts, ignore_eos)
            for i in range(args.rounds):
                rows["mullama_target_tps"].append(engine_round(model, args.tokens, prompts, alone)[0])
                tps, n_drafted, n_accepted = engine_round(model, args.tokens, prompts, drafting)
                rows["mullama_pair_tps"].append(tps)
                counts["mullama"] = [counts["mullama"][0] + n_drafted, counts["mullama"][1] + n_accepted]
                rows["server_target_tps"].append(server_round(servers["target"][1], args.tokens, prompts,
                                                              ignore_eos)[0])
                tps, n_drafted, n_accepted = server_round(servers["pair"][1], args.tokens, prompts, ignore_eos)
                rows["server_pair_tps"].append(tps)
                counts["server"] = [counts["server"][0] + n_drafted, counts["server"][1] + n_accepted]
                print(f"round {i + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    summary: dict[str, float | str] = {k: statistics.median(v) for k, v in rows.items()}
    for who in ("mullama", "server"):
        summary[f"{who}_speedup"] = summary[f"{who}_pair_tps"] / summary[f"{who}_target_tps"]
        drafted, accepted = counts[who]
        summary[f"{who}_acceptance"] = accepted / drafted if drafted else 0.0
    summary["mullama_vs_server_target"] = summary["mullama_target_tps"] / summary["server_target_tps"]
    summary["mullama_vs_server_pair"] = summary["mullama_pair_tps"] / summary["server_pair_tps"]
    print(f"target alone: Mullama {summary['mullama_target_tps']:.1f}, llama-server "
          f"{summary['server_target_tps']:.1f} tokens/s")
    for who, label in (("mullama", "Mullama"), ("server", "llama-server")):
        print(f"with {'n-grams' if args.ngram else 'the Q4_1 draft'}: {label} {summary[who + '_pair_tps']:.1f} "
              f"tokens/s, speed-up "
              f"{summary[who + '_speedup']:.2f}, acceptance {summary[who + '_acceptance']:.2f}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
