#!/usr/bin/env python3
"""Speech-to-text speed against whisper-cli, built from the same whisper.cpp source on the same ggml.

    python build_native.py --with-whisper --with-tools   # once: libwhisper and whisper-cli
    python bench/speech.py [--model PATH] [--threads N] [--rounds 3] [--beam-size 1] [--vad] [--json]
    python bench/speech.py --utterances [--windows off,default,0.5] [--speeds 160] [--rounds 3] [--json]

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

``--utterances`` measures short audio instead, as the voice loop sees it:
each Harvard sentence (espeak at each of ``--speeds`` words per minute),
between silences, cut out by the voice loop's own utterance detector, is
transcribed alone under each encoder window of ``--windows``: ``off`` (the
whole 30 s), ``default`` (the shipped one), or a margin in seconds beyond
the audio (with ``--floor``). It reports each window's word error rate over
all the utterances, how many utterances it got better and worse than the
first window, and its median and slowest time per utterance and median CPU
time (steadier than wall time on a shared machine); the windows alternate
within each round.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mullama.engine.model import default_threads  # noqa: E402
from mullama.ffi import loader  # noqa: E402
from mullama.speech import SpeechModel, load_audio  # noqa: E402
from mullama.speech.window import DEFAULT_WINDOW, EncoderWindow  # noqa: E402

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


def utterances(speeds: list[int], voices: list[str]) -> list[tuple[str, array]]:
    """(reference text, samples) of each sentence in each voice at each speed, as the voice loop cuts it out."""
    from speech_helpers import SENTENCES, cache_dir, sox, speak

    from mullama.speech.utterances import UtteranceDetector, UtteranceEnded
    from mullama.speech.vad import VoiceDetector

    found = []
    with VoiceDetector() as vad:
        for voice, speed, (index, sentence) in itertools.product(voices, speeds, enumerate(SENTENCES)):
            name = f"utterance-{index:02d}-{voice}-{speed}wpm"
            dest = cache_dir() / f"{name}.wav"
            if not dest.exists():
                raw = speak(sentence, cache_dir() / f"{name}-raw.wav", voice=voice, words_per_minute=speed)
                sox(raw, "-r", "16000", "-c", "1", "-b", "16", dest, "pad", "1", "1.5")
            detector = UtteranceDetector(vad.segments)
            samples = load_audio(dest).samples
            events = [e for i in range(0, len(samples), 320) for e in detector.feed(samples[i:i + 320])]
            ends = [e for e in events + detector.finish() if isinstance(e, UtteranceEnded)]
            found += [(sentence, e.samples) for e in ends[:1]]
    return found


def window_named(name: str, floor: float) -> EncoderWindow | None:
    """A window as ``--windows`` names it."""
    if name == "off":
        return None
    if name == "default":
        return DEFAULT_WINDOW
    return EncoderWindow(margin_s=float(name), floor_s=floor)


def utterance_bench(args: argparse.Namespace) -> None:
    from speech_helpers import word_errors

    clips = utterances(args.speeds, args.voices)
    seconds = [len(samples) / 16000 for _, samples in clips]
    names = args.windows.split(",")
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, list[tuple[int, int]]] = {}
    path = args.model or default_model()
    with contextlib.ExitStack() as stack:
        models = {name: stack.enter_context(SpeechModel(path, num_thread=args.threads,
                                                        window=window_named(name, args.floor))) for name in names}
        for model in models.values():
            model.transcribe(clips[0][1], vad=False)  # warm-up
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                errors[name] = []
                for reference, samples in clips:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    text = models[name].transcribe(samples, vad=False).text
                    times[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
                    errors[name].append(word_errors(reference, text))
                    if args.verbose and errors[name][-1][0]:
                        print(f"  {name}: {text!r} for {reference!r}")
    print(f"{path.name}, {len(clips)} utterances of {min(seconds):.1f}-{max(seconds):.1f} s "
          f"(voices {args.voices}, speeds {args.speeds} wpm), {args.threads} threads, {args.rounds} rounds:")
    results = {}
    for name in names:
        wrong, total = (sum(column) for column in zip(*errors[name]))
        median, slowest, cpu_median = statistics.median(times[name]), max(times[name]), statistics.median(cpu[name])
        # Paired with the first window: utterances with fewer and with more errors (a sign test's counts).
        pairs = list(zip(errors[name], errors[names[0]]))
        better, worse = sum(a[0] < b[0] for a, b in pairs), sum(a[0] > b[0] for a, b in pairs)
        results[name] = {"wer": round(wrong / total, 4), "word_errors": wrong, "words": total,
                         "median_s": round(median, 4), "max_s": round(slowest, 4),
                         "median_cpu_s": round(cpu_median, 4), "better": better, "worse": worse}
        print(f"  window {name:8s} WER {wrong / total:6.2%} ({wrong}/{total}), better/worse than {names[0]} in "
              f"{better}/{worse} utterances, {1000 * median:7.1f} ms per utterance (slowest {1000 * slowest:.0f}, CPU {1000 * cpu_median:.0f})")
    if args.json:
        print(json.dumps({"utterances": len(clips), "threads": args.threads, "windows": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a whisper.cpp model file (default: the tests' tiny.en)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--vad", action="store_true", help="both sides find the speech first (Silero VAD)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--utterances", action="store_true", help="short utterances under several encoder windows")
    parser.add_argument("--windows", default="off,default", help="off, default, or margins in seconds")
    parser.add_argument("--floor", type=float, default=0.0, help="the shortest window of a margin, in seconds")
    parser.add_argument("--speeds", type=lambda text: [int(v) for v in text.split(",")], default=[160],
                        help="espeak's words per minute, comma-separated")
    parser.add_argument("--voices", type=lambda text: text.split(","), default=["en-us"],
                        help="espeak-ng voices, comma-separated")
    parser.add_argument("--verbose", action="store_true", help="print each wrong transcript")
    args = parser.parse_args()
    if args.utterances:
        utterance_bench(args)
        return

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
