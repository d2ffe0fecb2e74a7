#!/usr/bin/env python3
"""Speech-to-text speed against whisper-cli, built from the same whisper.cpp source on the same ggml.

    python build_native.py --with-whisper --with-tools   # once: libwhisper and whisper-cli
    python bench/speech.py [--model PATH] [--threads N] [--rounds 3] [--beam-size 1] [--vad] [--json]

The recording is 60 s of speech: espeak-ng reading the Harvard sentences of
the test suite, 0.7 s apart, cut to 60 s by sox. Both sides use the same
model file, threads, decoding (greedy unless ``--beam-size``), non-speech
token suppression and flash attention, with VAD off unless ``--vad``; they
alternate round by round so both see the same machine load, and the medians
are compared. whisper-cli's time is its own ``total time`` less its ``load
time`` (reading the WAV, the mel spectrogram, encoding and decoding);
Mullama's is reading the WAV plus ``SpeechModel.transcribe`` on a loaded
model. The real-time factor (RTF) is processing time over audio length;
``ratio`` is whisper-cli's time over Mullama's (above 1: Mullama faster).
CPU seconds are reported too (whisper-cli's whole run, its model load
included): on a shared machine they move less than wall time does.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402
from mullama.speech import SpeechModel, load_audio  # noqa: E402

SECONDS = 60.0


def find_whisper_cli() -> Path:
    native = loader.load()
    candidate = native.directory.parent / "bin" / "whisper-cli"
    if candidate.exists():
        return candidate
    raise SystemExit("whisper-cli not found next to the libraries: run `python build_native.py --with-whisper "
                     "--with-tools`")


def recording() -> Path:
    """60 s of espeak speech (the test suite's sentences), made once in the cache."""
    from speech_helpers import cache_dir, harvard_recording, sox

    dest = cache_dir() / "bench-60s.wav"
    if not dest.exists():
        sox(harvard_recording(), dest, "trim", "0", str(SECONDS))
    return dest


def default_model() -> Path:
    from whisper_weights import whisper_tiny_en_path

    return whisper_tiny_en_path()


def cli_round(exe: Path, model: Path, audio: Path, threads: int, beam: int,
              vad_model: Path | None) -> tuple[float, float, str]:
    """(seconds of processing, CPU seconds of the whole run, text) from one whisper-cli run."""
    command = [str(exe), "-m", str(model), "-f", str(audio), "-t", str(threads), "-bs", str(beam),
               "--suppress-nst", "-fa"]
    if vad_model is not None:
        command += ["--vad", "--vad-model", str(vad_model)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if result.returncode != 0:
        raise SystemExit(f"whisper-cli failed: {result.stderr.strip().splitlines()[-1:]}")
    load = float(re.search(r"load time =\s*([\d.]+) ms", result.stderr).group(1))
    total = float(re.search(r"total time =\s*([\d.]+) ms", result.stderr).group(1))
    # Each line is "[start --> end]   text"; the text alone is compared.
    text = " ".join(re.sub(r"^\[[^\]]*\]", "", line).strip() for line in result.stdout.splitlines() if line.strip())
    return (total - load) / 1000, cpu, text


def mullama_round(model: SpeechModel, audio: Path, beam: int, vad: bool) -> tuple[float, float, str]:
    """(seconds, CPU seconds, text) of reading the WAV and transcribing it on the loaded model."""
    started, cpu = time.perf_counter(), time.process_time()
    segments = model.transcribe(load_audio(audio), beam_size=beam, vad=vad).segments
    return time.perf_counter() - started, time.process_time() - cpu, " ".join(s.text.strip() for s in segments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a whisper.cpp model file (default: the tests' tiny.en)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--vad", action="store_true", help="both sides find the speech first (Silero VAD)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()

    exe, audio, path = find_whisper_cli(), recording(), args.model or default_model()
    vad_model = loader.load_whisper().vad_model if args.vad else None
    times: dict[str, list[float]] = {"cli": [], "mullama": []}
    cpu: dict[str, list[float]] = {"cli": [], "mullama": []}
    texts: dict[str, str] = {}
    with SpeechModel(path, num_thread=args.threads) as model:
        mullama_round(model, audio, args.beam_size, args.vad)  # warm-up: first-touch of weights and buffers
        for i in range(args.rounds):
            for side in (("cli", "mullama") if i % 2 == 0 else ("mullama", "cli")):
                if side == "cli":
                    seconds, cpu_s, texts[side] = cli_round(exe, path, audio, args.threads, args.beam_size, vad_model)
                else:
                    seconds, cpu_s, texts[side] = mullama_round(model, audio, args.beam_size, args.vad)
                times[side].append(seconds)
                cpu[side].append(cpu_s)
                print(f"round {i + 1}: {side:8s} {seconds:6.2f} s  (RTF {seconds / SECONDS:.3f}), CPU {cpu_s:6.2f} s",
                      flush=True)
    cli, ours = statistics.median(times["cli"]), statistics.median(times["mullama"])
    cli_cpu, ours_cpu = statistics.median(cpu["cli"]), statistics.median(cpu["mullama"])
    same = texts["cli"] == texts["mullama"]
    print(f"\n{path.name}, {SECONDS:.0f} s of speech, {args.threads} threads, beam {args.beam_size}, "
          f"VAD {'on' if args.vad else 'off'}, medians of {args.rounds}:")
    print(f"  whisper-cli  {cli:6.2f} s  RTF {cli / SECONDS:.3f}")
    print(f"  Mullama      {ours:6.2f} s  RTF {ours / SECONDS:.3f}")
    print(f"  ratio (whisper-cli / Mullama) {cli / ours:.2f}; same text: {same}")
    print(f"  CPU seconds: whisper-cli {cli_cpu:.2f} (whole run, load included), Mullama {ours_cpu:.2f}; "
          f"ratio {cli_cpu / ours_cpu:.2f}")
    if args.json:
        print(json.dumps({"seconds_of_audio": SECONDS, "threads": args.threads, "beam_size": args.beam_size,
                          "vad": args.vad, "cli_s": round(cli, 3), "mullama_s": round(ours, 3),
                          "cli_rtf": round(cli / SECONDS, 4), "mullama_rtf": round(ours / SECONDS, 4),
                          "ratio": round(cli / ours, 3), "cli_cpu_s": round(cli_cpu, 3),
                          "mullama_cpu_s": round(ours_cpu, 3), "cpu_ratio": round(cli_cpu / ours_cpu, 3),
                          "same_text": same}))


if __name__ == "__main__":
    main()
