#!/usr/bin/env python3
"""Engine speed against llama-bench, built from the same llama.cpp source.

    python build_native.py --with-tools      # once: builds llama-bench beside the libraries
    python bench/engine.py [--model PATH|fast] [--threads N] [--rounds 5] [--backend-sampling] [--json]

Prompt processing (512 tokens in one batch, as llama-bench's pp512) and
decoding (128 tokens one at a time, as tg128) are measured for Mullama's
engine and for llama-bench, one after the other in each round so that both
see the same machine load; the ratio is the median of the rounds' ratios. With ``--json`` the last line
is a JSON object with ``decode_ratio`` and ``prompt_ratio`` (engine /
llama-bench).

On a shared machine other work moves wall-clock figures by tens of
percent. The host's work per token is therefore also measured in CPU time
(this process's, all threads), against a bare decode loop like
llama-bench's on the same context, round by round: ``decode_cpu_ratio`` is
engine / bare, the share of a decode step the engine's own work (sampling,
text, scheduling) costs. ``--model fast`` is the test model cut to two layers
(tests/fast_model.py): a decode step as short as a GPU's, with the real
vocabulary, so the host's work per token shows. ``--backend-sampling``
has llama.cpp sample inside the model's graph (the option
``backend_sampling``), which spares a GPU the logits' copy to the host.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mullama  # noqa: E402
from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402

N_PROMPT = 512
N_GEN = 128


def find_llama_bench(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    native = loader.load()
    candidate = native.directory.parent / "bin" / "llama-bench"
    if candidate.exists():
        return candidate
    raise SystemExit("llama-bench not found next to the loaded libraries: run `python build_native.py --with-tools`")


def resolve_model(given: str | None) -> Path:
    """``given``, or the test model when None, or the fast stand-in for ``fast``."""
    if given is not None and given != "fast":
        return Path(given)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import smollm2_path
    from fast_model import fast_model_path

    return fast_model_path() if given == "fast" else smollm2_path()


def llama_bench_round(exe: Path, model: Path, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) from one llama-bench run."""
    command = [str(exe), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN), "-t", str(threads),
               "-r", "1", "-fa", "auto", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama-bench failed: {result.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(result.stdout)
    prompt = next(r["avg_ts"] for r in rows if r["n_prompt"] == N_PROMPT and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] == N_GEN and r["n_prompt"] == 0)
    return prompt, decode


def engine_round(model: mullama.Model, rng: random.Random, in_graph: bool) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) through the engine's public generation path."""
    prompt = [rng.randrange(100, model.n_vocab) for _ in range(N_PROMPT)]
    model.context.forget(0)
    pp = model.complete(prompt, temperature=0, num_predict=1, backend_sampling=in_graph).timings
    model.context.forget(0)
    tokens = model.tokenize(ESSAY)
    tg = model.complete(tokens, temperature=0, num_predict=N_GEN, backend_sampling=in_graph).timings
    return pp.prompt_eval_count / pp.prompt_eval_duration * 1e9, tg.eval_count / tg.eval_duration * 1e9


ESSAY = "<|im_start|>user\nWrite a very long essay about the history of Rome.<|im_end|>\n<|im_start|>assistant\n"


def cpu_round(model: mullama.Model, in_graph: bool) -> tuple[float, float]:
    """(engine, bare loop) decode tokens per CPU second, over the same tokens after the same prompt."""
    tokens = model.tokenize(ESSAY)
    model.context.forget(0)
    generation = model.generate(tokens, temperature=0, num_predict=N_GEN + 1, backend_sampling=in_graph)
    pieces = iter(generation)
    next(pieces)  # the prompt and the first token
    started = time.process_time()
    for _ in pieces:
        pass
    engine = (generation.result.timings.eval_count - 1) / (time.process_time() - started)
    generated = generation.result.tokens
    context, batch = model.context, model.context.batch
    context.forget(0)
    batch.clear()
    for i, token in enumerate(tokens):
        batch.add(token, i, 0, i == len(tokens) - 1)
    context.decode(batch)
    started = time.process_time()
    # llama-bench's tg loop: one token per decode, logits out, nothing sampled.
    for i, token in enumerate(generated[:-1]):
        batch.clear()
        batch.add(token, len(tokens) + i, 0, True)
        context.decode(batch)
    bare = (len(generated) - 1) / (time.process_time() - started)
    context.forget(0)
    return engine, bare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file, or `fast` for the fast stand-in (default: the test model)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-bench", help="path of llama-bench (default: from the build cache)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--backend-sampling", action="store_true", help="the engine samples in the model's graph")
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    exe = find_llama_bench(args.llama_bench)
    rng = random.Random(0)
    ours, theirs, cpu = [], [], []
    with mullama.Model(model_path, num_ctx=N_PROMPT + N_GEN + 64, num_batch=N_PROMPT, num_thread=args.threads) as model:
        engine_round(model, rng, args.backend_sampling)  # warm-up: page in the weights, build the graphs
        for i in range(args.rounds):
            theirs.append(llama_bench_round(exe, model_path, args.threads))
            ours.append(engine_round(model, rng, args.backend_sampling))
            cpu.append(cpu_round(model, args.backend_sampling))
            print(f"round {i + 1}: engine pp {ours[-1][0]:8.1f} tg {ours[-1][1]:7.1f} | "
                  f"llama-bench pp {theirs[-1][0]:8.1f} tg {theirs[-1][1]:7.1f} tokens/s | CPU time: "
                  f"engine tg {cpu[-1][0]:7.1f} bare loop tg {cpu[-1][1]:7.1f} tokens/s", flush=True)
    summary = {
        "model": model_path.name,
        "threads": args.threads,
        "engine_prompt_tps": statistics.median(r[0] for r in ours),
        "engine_decode_tps": statistics.median(r[1] for r in ours),
        "llama_bench_prompt_tps": statistics.median(r[0] for r in theirs),
        "llama_bench_decode_tps": statistics.median(r[1] for r in theirs),
    }
    # Each round's two runs follow each other within seconds; the machine's speed drifts more than that
    # between rounds on a shared host, so each round's ratio is taken before the median.
    summary["prompt_ratio"] = statistics.median(o[0] / t[0] for o, t in zip(ours, theirs))
    summary["decode_ratio"] = statistics.median(o[1] / t[1] for o, t in zip(ours, theirs))
    summary["decode_cpu_ratio"] = statistics.median(engine / bare for engine, bare in cpu)
    print(f"pp{N_PROMPT}: engine {summary['engine_prompt_tps']:.1f} vs llama-bench "
          f"{summary['llama_bench_prompt_tps']:.1f} tokens/s (medians)  ratio {summary['prompt_ratio']:.3f} "
          "(median of the rounds' ratios)")
    print(f"tg{N_GEN}: engine {summary['engine_decode_tps']:.1f} vs llama-bench "
          f"{summary['llama_bench_decode_tps']:.1f} tokens/s (medians)  ratio {summary['decode_ratio']:.3f} "
          "(median of the rounds' ratios)")
    print(f"tg{N_GEN} in CPU time: engine / bare decode loop {summary['decode_cpu_ratio']:.3f} (median of rounds)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
