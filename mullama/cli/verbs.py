"""The verbs of the ``mullama`` command (``run``, ``pull``, ``list``...), their arguments, and :func:`main`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from mullama import __version__

from mullama.store import modelfile

from mullama.store import ollama_store
from mullama.cli.create import create_request, upload
from mullama.cli.daemon import connect
from mullama.cli.format import list_table, ps_table, show_info
from mullama.cli.generate import RunOptions, generate_once, load_model
from mullama.cli.interactive import History, Session, apply_show, last_model, remember_model, use_readline
from mullama.cli.keys import add_keys_verb
from mullama.cli.rpcserver import add_rpc_server_verb
from mullama.cli.speech import add_speech_verbs
from mullama.cli.stats import add_stats_verb
from mullama.cli.unsupported import add_refused_flags, check_verb
from mullama.cli.progress import Progress, follow
from mullama.client import APIError, Client, ConnectError
from mullama.errors import BadRequestError, MullamaError, NotFoundError
from mullama.store.names import ModelName

_THINK_VALUES = {"": True, "true": True, "false": False, "high": "high", "medium": "medium", "low": "low", "max": "max"}
_GO_DURATION = re.compile(r"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0")


def _show_or_pull(client: Client, name: str) -> dict[str, Any]:
    try:
        return client.post("/api/show", {"model": name}) or {}
    except APIError as error:
        if error.status != 404:
            raise
    follow(client.stream("/api/pull", {"model": name}), Progress(sys.stderr))
    return client.post("/api/show", {"model": name}) or {}


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground, with the ``--model`` models loaded and pinned first.

    ``--rpc`` spreads models over RPC workers (as ``MULLAMA_RPC`` does).
    """
    from mullama.engine.rpc import parse_endpoints
    from mullama.http.app import serve

    if args.rpc is not None:
        # The daemon reads its settings from the environment; the flag is one more way to set this one.
        os.environ["MULLAMA_RPC"] = ",".join(parse_endpoints(args.rpc))
    return serve(models=args.model)


def cmd_run(args: argparse.Namespace) -> int:
    """Answer one prompt, or start the interactive session."""
    opts = RunOptions(
        model=args.model,
        keep_alive=_keep_alive(args.keepalive),
        think=_think(args.think),
        hide_thinking=args.hidethinking,
        wordwrap=not args.nowordwrap,
        verbose=args.verbose,
        format=_format(args.format),
    )
    truncate = _go_bool_flag("truncate", args.truncate)
    dimensions = _go_int_flag("dimensions", args.dimensions)
    prompts = list(args.prompt)
    interactive = not prompts and sys.stdout.isatty()
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped:
            prompts.insert(0, piped)
        interactive = False
    opts.prompt = " ".join(prompts)
    client = connect()
    info = _show_or_pull(client, opts.model)
    apply_show(opts, info, think_set=opts.think is not None)
    if "speech" in (info.get("capabilities") or []):
        raise MullamaError(f"{opts.model} is a speech model: transcribe a recording with "
                           f"`mullama transcribe FILE --model {opts.model}`")
    if "embedding" in (info.get("capabilities") or []):
        if not opts.prompt:
            raise BadRequestError(f'embedding models require input text. Usage: mullama run {opts.model} "your text here"')
        body = {"model": opts.model, "input": opts.prompt} | ({"keep_alive": opts.keep_alive} if opts.keep_alive else {})
        if truncate is not None:
            body["truncate"] = truncate
        if dimensions > 0:
            body["dimensions"] = dimensions
        embeddings = (client.post("/api/embed", body) or {}).get("embeddings") or []
        if not embeddings:
            raise MullamaError("no embeddings returned")
        print(float32_json(embeddings[0]))
        return 0
    remember_model(opts.model)
    if not interactive:
        generate_once(client, opts, sys.stdout, sys.stderr)
        return 0
    load_model(client, opts)
    for message in opts.loaded_messages:
        if message.get("role") == "user":
            print(f">>> {message.get('content', '')}")
        elif message.get("role") == "assistant":
            print(f"{message.get('content', '')}\n")
    history = History.open()
    use_readline(history)
    return Session(client, opts, sys.stdout, sys.stderr, history).run(input)


def cmd_chat(args: argparse.Namespace) -> int:
    """The interactive session with a model: the one named, else the one last used, else the default."""
    args.model = args.model or last_model()
    args.prompt, args.truncate, args.dimensions = [], None, None
    return cmd_run(args)


def _go_bool_flag(name: str, value: str | None) -> bool | None:
    """A boolean flag's value as Go's flag package reads it (``None`` when not given)."""
    if value is None:
        return None
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise BadRequestError(f'invalid argument "{value}" for "--{name}" flag: strconv.ParseBool: parsing "{value}": invalid syntax')


def _go_int_flag(name: str, value: str | None) -> int:
    """An integer flag's value as Go's flag package reads it (0 when not given)."""
    if value is None:
        return 0
    if not re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO]?[0-7_]*|[1-9][0-9_]*)", value):
        raise BadRequestError(f'invalid argument "{value}" for "--{name}" flag: strconv.ParseInt: parsing "{value}": invalid syntax')
    return int(value, 0)


def float32_json(vector: list[float]) -> str:
    """A vector as Go's ``json.Marshal`` writes a ``[]float32``: the shortest digits that read back the same float32."""
    return "[" + ",".join(_float32(value) for value in vector) + "]"


def _single(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _float32(value: float) -> str:
    single = _single(value)
    if single == 0:
        return "-0" if math.copysign(1, single) < 0 else "0"
    text = next(text for digits in range(9) if _reads_back((text := f"{single:.{digits}e}"), single))
    mantissa, exponent = text.split("e")
    shortest = Decimal(f"{mantissa}e{exponent}")
    # Go compares in float32 too: float32(1e-6) itself is written without an exponent.
    if abs(single) < _single(1e-6) or abs(single) >= _single(1e21):
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{int(exponent):+03d}".replace("e-0", "e-")
    return format(shortest, "f")


def _reads_back(text: str, single: float) -> bool:
    try:
        return _single(float(text)) == single
    except OverflowError:  # rounded past float32's largest value
        return False


def _think(value: str | None) -> bool | str | None:
    if value is None:
        return None
    if value not in _THINK_VALUES:
        raise BadRequestError(f'invalid value for --think: "{value}" (must be true, false, high, medium, low, or max)')
    return _THINK_VALUES[value]


def _keep_alive(value: str | None) -> str | None:
    if value and not _GO_DURATION.fullmatch(value):
        raise BadRequestError(f'time: invalid duration "{value}"')
    return value or None


def _format(value: str | None) -> Any:
    if not value:
        return None
    if value == "json":
        return "json"
    try:
        return json.loads(value)
    except ValueError:
        raise BadRequestError(f"invalid --format: {value} (use json or a JSON schema)") from None


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model, showing progress on stderr."""
    body = {"model": args.model} | ({"insecure": True} if args.insecure else {})
    follow(connect().stream("/api/pull", body), Progress(sys.stderr))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a model to its registry."""
    body = {"model": args.model} | ({"insecure": True} if args.insecure else {})
    try:
        follow(connect().stream("/api/push", body), Progress(sys.stderr, verb="pushing"))
    except APIError as error:
        if "access denied" in error.message.lower() or "unauthorized" in error.message.lower():
            raise APIError(error.status, "you are not authorized to push to this namespace, create the model under a namespace you own") from None
        raise
    print(f"\nYou can find your model at:\n\n\t{args.model}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the models in the store, or with ``--ollama`` those Ollama's store holds that ``pull`` imports."""
    models = ollama_models() if args.ollama else (connect().get("/api/tags") or {}).get("models") or []
    sys.stdout.write(list_table(models, args.prefix or ""))
    return 0


def ollama_models() -> list[dict[str, Any]]:
    """The importable models of this machine's Ollama store, shaped like ``/api/tags`` entries.

    Read from this machine's disk, not asked of the daemon: it tells what
    ``pull`` imports when the daemon runs here, which is the usual case.
    """
    root = ollama_store.ollama_root()
    if root is None:
        raise NotFoundError("no Ollama model store found: set OLLAMA_MODELS to its directory "
                            "(default ~/.ollama/models)")
    return [{"name": entry.name.display, "digest": entry.digest, "size": entry.size,
             "modified_at": datetime.fromtimestamp(entry.modified, timezone.utc).isoformat()}
            for entry in ollama_store.list_importable(root)]


def cmd_ps(args: argparse.Namespace) -> int:
    """Print the loaded models."""
    sys.stdout.write(ps_table((connect().get("/api/ps") or {}).get("models") or [], args.prefix or ""))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    """Create a model from a Modelfile, uploading its local files first."""
    try:
        ModelName.parse(args.model)
    except BadRequestError:
        raise BadRequestError(f"invalid model name: {args.model}") from None
    path = Path(args.file or "Modelfile").absolute()
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"{path} is not UTF-8 text") from None
    elif args.file:
        raise NotFoundError(f"specified Modelfile wasn't found: {args.file}")
    else:
        text = "FROM .\n"
    progress = Progress(sys.stderr, verb="copying")
    try:
        progress.status("gathering model components")
        plan = create_request(modelfile.parse(text), path.parent, in_place=args.in_place)
        client = connect()
        for digest, file in plan.uploads.items():
            upload(client, digest, file, progress)
        if args.quantize:
            plan.request["quantize"] = args.quantize
        for event in client.stream("/api/create", {"model": args.model, **plan.request}):
            progress.update(event)
    finally:
        progress.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a model's details, or one part of it."""
    chosen = [flag for flag in ("license", "modelfile", "parameters", "system", "template") if getattr(args, flag)]
    if len(chosen) > 1:
        raise BadRequestError("only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified")
    body = {"model": args.model} | ({"verbose": True} if args.verbose else {})
    info = connect().post("/api/show", body) or {}
    if not chosen:
        sys.stdout.write(show_info(info, args.verbose))
    elif chosen[0] in ("system", "template"):
        sys.stdout.write(str(info.get(chosen[0]) or ""))
    else:
        print(info.get(chosen[0]) or "")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete models, unloading each first."""
    client = connect()
    for name in args.models:
        try:
            load_model(client, RunOptions(model=name, keep_alive="0"))
        except APIError as error:
            if "not found" not in error.message.lower():
                print(f"Warning: unable to stop model '{name}'", file=sys.stderr)
        client.delete("/api/delete", {"model": name})
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a model under a new name."""
    connect().post("/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Unload a running model: a generate request with ``keep_alive`` 0, as Ollama sends."""
    try:
        load_model(connect(), RunOptions(model=args.model, keep_alive="0"))
    except APIError as error:
        if "not found" in error.message.lower():
            raise NotFoundError(f'couldn\'t find model "{args.model}" to stop') from None
        raise
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    """The terminal UI: chat, models, running models, statistics."""
    return run_tui(connect(), args.model or "")


def run_tui(client: Client, model: str) -> int:
    """Open the terminal UI (curses is imported only then)."""
    from mullama.cli.tui import run

    return run(client, model)


def print_version() -> int:
    """``mullama version is X``, and the server's version when one answers."""
    client = connect(start=False)
    try:
        answer = client.get("/api/version") or {}
        # Mullama reports an Ollama version for Ollama's clients, and its own beside it.
        server = str(answer.get("mullama_version") or answer.get("version") or "")
    except (ConnectError, APIError):
        server = ""
    if not server:
        print("Warning: could not connect to a running Mullama instance", file=sys.stderr)
        print(f"mullama version is {__version__}")
        return 0
    print(f"mullama version is {server}")
    if server != __version__:
        print(f"Warning: client version is {__version__}")
    return 0


# Arguments ----------------------------------------------------------------


class _UsageError(BadRequestError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = _Parser(prog="mullama", description="Large language model runner (an Ollama drop-in).")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    # As Ollama's: with no command, a terminal opens the TUI, whose answers show their timings anyway.
    parser.add_argument("--verbose", action="store_true", help="show timings for responses")
    parser.add_argument("--nowordwrap", action="store_true", help="don't wrap words to the next line")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, handler: Callable[[argparse.Namespace], int], help: str, aliases: Iterable[str] = ()) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, aliases=list(aliases), description=help)
        sub.set_defaults(handler=handler)
        return sub

    sub = verb("serve", cmd_serve, "Start the server", ["start"])
    sub.add_argument("--model", action="append", default=[], metavar="MODEL",
                     help="load this model at start and keep it loaded (repeat for several)")
    sub.add_argument("--rpc", metavar="HOST:PORT,...",
                     help="spread models over these `mullama rpc-server` workers (default: MULLAMA_RPC)")
    sub = verb("create", cmd_create, "Create a model from a Modelfile")
    sub.add_argument("model", metavar="MODEL")
    sub.add_argument("-f", "--file", help='name of the Modelfile (default "Modelfile")')
    sub.add_argument("-q", "--quantize", help="quantize the model to this level (e.g. q4_K_M)")
    sub.add_argument("--in-place", action="store_true",
                     help="use the GGUF file named by FROM where it lies instead of copying it into the store")
    add_refused_flags("create", sub)
    sub = verb("show", cmd_show, "Show information for a model")
    sub.add_argument("model", metavar="MODEL")
    for flag in ("license", "modelfile", "parameters", "template", "system"):
        sub.add_argument(f"--{flag}", action="store_true", help=f"show the {flag} of a model")
    sub.add_argument("-v", "--verbose", action="store_true", help="show detailed model information")
    sub = verb("run", cmd_run, "Run a model")
    sub.add_argument("model", metavar="MODEL")
    sub.add_argument("prompt", metavar="PROMPT", nargs="*", default=[])
    _session_flags(sub)
    sub.add_argument("--truncate", metavar="BOOL",
                     help="for embedding models: truncate inputs exceeding the context length (default: true); "
                          "--truncate=false to error instead")
    sub.add_argument("--dimensions", metavar="N",
                     help="truncate output embeddings to this many dimensions (embedding models only)")
    sub = verb("chat", cmd_chat, "Chat with a model (by default the one last used, else smollm2:135m)")
    sub.add_argument("model", metavar="MODEL", nargs="?")
    _session_flags(sub)
    sub = verb("stop", cmd_stop, "Stop a running model")
    sub.add_argument("model", metavar="MODEL")
    for name, handler, help in (("pull", cmd_pull, "Pull a model from a registry"), ("push", cmd_push, "Push a model to a registry")):
        sub = verb(name, handler, help)
        sub.add_argument("model", metavar="MODEL")
        sub.add_argument("--insecure", action="store_true", help="use an insecure registry")
    sub = verb("list", cmd_list, "List models", ["ls"])
    sub.add_argument("prefix", nargs="?", help="show only names starting with this")
    sub.add_argument("--ollama", action="store_true",
                     help="list the models of Ollama's store that `pull` imports without downloading")
    sub = verb("ps", cmd_ps, "List running models")
    sub.add_argument("prefix", nargs="?", help="show only names starting with this")
    sub = verb("cp", cmd_cp, "Copy a model")
    sub.add_argument("source", metavar="SOURCE")
    sub.add_argument("destination", metavar="DESTINATION")
    sub = verb("rm", cmd_rm, "Remove a model")
    sub.add_argument("models", metavar="MODEL", nargs="+")
    add_stats_verb(verb)
    add_keys_verb(verb)
    add_speech_verbs(verb)
    add_rpc_server_verb(verb)
    sub = verb("tui", cmd_tui, "Open the terminal UI: chat, models, running models")
    sub.add_argument("model", metavar="MODEL", nargs="?", help="the model to chat with first")
    return parser


def _session_flags(sub: argparse.ArgumentParser) -> None:
    """The flags ``run`` and ``chat`` share."""
    sub.add_argument("--keepalive", help="how long to keep the model loaded (e.g. 5m)")
    sub.add_argument("--verbose", action="store_true", help="show timings for the response")
    sub.add_argument("--insecure", action="store_true", help="use an insecure registry")
    sub.add_argument("--nowordwrap", action="store_true", help="don't wrap words to the next line")
    sub.add_argument("--format", help="response format (json, or a JSON schema)")
    sub.add_argument("--think", help="enable thinking: true/false, or high/medium/low")
    sub.add_argument("--hidethinking", action="store_true", help="hide the thinking output")


#: Flags that take a value only after ``=``, as Go's boolean flags do.
_OPTIONAL_VALUE_FLAGS = ("--think", "--truncate")


def _normalise_argv(argv: list[str]) -> list[str]:
    """A bare ``--think`` or ``--truncate`` means ``=true``, so it never swallows the prompt that follows."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [(arg + "=true" if arg in _OPTIONAL_VALUE_FLAGS else arg) for arg in argv[:end]] + argv[end:]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        check_verb(words)
        args, extra = parser.parse_known_args(_normalise_argv(words))
        if extra and getattr(args, "prompt", None) is not None and not any(word.startswith("-") for word in extra):
            # Flags may come between prompt words, as with Ollama's ``run MODEL --verbose why is the sky blue``.
            args.prompt += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.version:
            return print_version()
        if args.verb is None:
            if sys.stdin.isatty() and sys.stdout.isatty():
                return run_tui(connect(), "")
            parser.print_help()
            return 0
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0
    except MullamaError as error:
        print(f"Error: {_one_line(error.message)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``mullama list | head``): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"Error: {_one_line(str(error))}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown error"
