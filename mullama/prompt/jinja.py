"""Render a GGUF's own chat template (``tokenizer.chat_template``).

These templates are Hugging Face Jinja, written for ``transformers``'
``apply_chat_template``; this module gives them the same variables, filters
and message shape.  A template comes from a downloaded file, so it is
untrusted code: it runs in Jinja's immutable sandbox (no attribute access
that could reach Python internals, CVE-2024-34359), and within a budget of
steps, time and size, so a hostile template can neither hang nor exhaust
memory.  ``jinja2`` is imported on first use only.
"""

from __future__ import annotations

import functools
import json
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mullama.errors import BadRequestError
from mullama.types import Message, Tool

#: The longest template accepted (real ones are under 40 000); compiling this much can take seconds.
MAX_TEMPLATE_CHARS = 100_000
#: The longest prompt a template may produce, in characters.
MAX_OUTPUT_CHARS = 8_000_000
#: The most loop iterations plus calls one rendering may take.
MAX_STEPS = 1_000_000
#: The wall-clock time one rendering may take, in seconds.
MAX_SECONDS = 5.0
#: The longest string or list any single operation of a template may produce.
MAX_VALUE_SIZE = 8_000_000
#: The total size of the values a rendering may produce, all operations together.
MAX_TOTAL_SIZE = 64_000_000
#: The largest integer argument a filter or a padding method may take (a width, a count).
MAX_ARGUMENT = 100_000
#: The largest integer (in bits) that arithmetic may produce.
MAX_INT_BITS = 4096

#: The most digits a width or precision may have before its value is looked at (int() of more is slow).
_WIDTH_DIGITS = 7
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# Filters whose integer arguments are widths or counts, not values.
_SIZED_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "slice", "batch", "tojson"})


class ChatTemplateError(BadRequestError):
    """A chat template that fails to render, breaks the sandbox or exceeds its budget."""


def render_jinja(
    template: str,
    messages: list[Message],
    tools: list[Tool] | None = None,
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    extra: dict[str, Any] | None = None,
) -> str:
    """Render a Hugging Face chat template into a prompt.

    ``extra`` adds variables (``enable_thinking``, ``reasoning_effort``...);
    it cannot replace the ones set here.  Any failure of the template, a
    ``raise_exception`` it calls included, raises :class:`ChatTemplateError`.
    """
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template longer than {MAX_TEMPLATE_CHARS} characters")
    variables = dict(extra or {})
    variables.update(
        messages=[_message_dict(message) for message in messages],
        tools=[_tool_dict(tool) for tool in tools] if tools else None,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )
    budget = _BUDGET.set(_Budget(deadline=time.monotonic() + MAX_SECONDS))
    try:
        compiled = _compile(template)
        output: list[str] = []
        size = 0
        for chunk in compiled.generate(variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _LimitError(f"output longer than {MAX_OUTPUT_CHARS} characters")
            output.append(chunk)
    except Exception as error:  # noqa: BLE001 - whatever the template does is its own error
        raise ChatTemplateError(_describe(error)) from None
    finally:
        _BUDGET.reset(budget)
    return "".join(output)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    """Compile a template once; compiling costs more than most renderings."""
    sandbox = _sandbox()
    return sandbox.from_string(sandbox.guard(sandbox.parse(template)))


class _LimitError(Exception):
    """A template that exceeded its budget."""


@dataclass
class _Budget:
    """What one rendering has spent so far."""

    deadline: float
    steps: int = 0
    total_size: int = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _LimitError(f"more than {MAX_STEPS} steps")
        if time.monotonic() > self.deadline:
            raise _LimitError(f"rendering took longer than {MAX_SECONDS} seconds")

    def produced(self, value: Any) -> Any:
        """Account for a value an operation produced and return it."""
        if isinstance(value, (str, list, tuple, dict)):
            if len(value) > MAX_VALUE_SIZE:
                raise _LimitError(f"a value longer than {MAX_VALUE_SIZE}")
            self.total_size += len(value)
            if self.total_size > MAX_TOTAL_SIZE:
                raise _LimitError(f"values longer than {MAX_TOTAL_SIZE} in total")
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
        return value


# The budget of the rendering under way in this thread (or task); the compiled
# templates and their environment are shared, so it cannot live on them.
_BUDGET: ContextVar[_Budget] = ContextVar("chat_template_budget")


def _describe(error: Exception) -> str:
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.exceptions import SecurityError

    if isinstance(error, TemplateSyntaxError):
        return f"chat template syntax error on line {error.lineno}: {error.message}"
    if isinstance(error, SecurityError):
        return f"chat template blocked by the sandbox: {error}"
    if isinstance(error, _LimitError):
        return f"chat template exceeded its budget: {error}"
    if isinstance(error, RecursionError):
        return "chat template recursed too deeply"
    if isinstance(error, MemoryError):
        return "chat template ran out of memory"
    if isinstance(error, TemplateError):
        return f"chat template error: {error}"
    return f"chat template failed: {type(error).__name__}: {error}"


def _message_dict(message: Message) -> dict[str, Any]:
    """The message as ``transformers`` passes it: only the keys that apply."""
    result: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.thinking:
        # Qwen and DeepSeek templates read ``reasoning_content``, gpt-oss reads ``thinking``.
        result["reasoning_content"] = message.thinking
        result["thinking"] = message.thinking
    if message.tool_calls:
        result["tool_calls"] = [
            ({"id": call.id} if call.id else {})
            | {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        result["tool_call_id"] = message.tool_call_id
    if message.tool_name:
        result["name"] = message.tool_name
    return result


def _tool_dict(tool: Tool) -> dict[str, Any]:
    """The tool as the JSON Schema ``transformers`` renders."""
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": function}


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    """``transformers``' ``tojson``: no HTML escaping, and its formatting options."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for argument in (*args, *kwargs.values()):
        if isinstance(argument, int) and not isinstance(argument, bool) and abs(argument) > MAX_ARGUMENT:
            raise _LimitError(f"an argument larger than {MAX_ARGUMENT}")


def _check_width(digits: str) -> None:
    if len(digits) > _WIDTH_DIGITS or digits and int(digits) > MAX_ARGUMENT:
        raise _LimitError(f"a format width or precision larger than {MAX_ARGUMENT}")


def _check_percent_format(text: Any, values: Any) -> None:
    """Bound every width and precision of ``text % values``, those taken from ``values`` (``%*d``) included.

    The format is read as Python reads it: ``%``, an optional ``(key)``
    with nested parentheses, flags, a width (digits or ``*``), a precision
    (``.`` then digits or ``*``), a length modifier and the conversion.
    """
    if not isinstance(text, str):
        return
    positional = list(values) if isinstance(values, tuple) else [values]
    taken = 0
    at = text.find("%")
    while at >= 0:
        at += 1
        if text.startswith("(", at):
            depth = 0
            while at < len(text):
                depth += {"(": 1, ")": -1}.get(text[at], 0)
                at += 1
                if depth == 0:
                    break
        while at < len(text) and text[at] in "#0- +":
            at += 1
        for part in ("width", "precision"):
            if part == "precision":
                if not text.startswith(".", at):
                    break
                at += 1
            if text.startswith("*", at):
                star = positional[taken] if taken < len(positional) else 0
                taken += 1
                at += 1
                _check_arguments((star,), {})
            else:
                start = at
                while at < len(text) and "0" <= text[at] <= "9":
                    at += 1
                _check_width(text[start:at])
        while at < len(text) and text[at] in "hlL":
            at += 1
        if at < len(text) and text[at] != "%":
            taken += 1
        at = text.find("%", at + 1)


def _check_format_spec(format_spec: str) -> None:
    """Bound the numbers of one ``{}`` field's format spec (its fill may be a digit: that is one digit)."""
    digits = ""
    for char in format_spec + " ":
        if "0" <= char <= "9":
            digits += char
        else:
            _check_width(digits)
            digits = ""


@functools.cache
def _sandbox() -> Any:
    """Build the sandbox once, when jinja2 is first needed; it is never changed after."""
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
    from jinja2.visitor import NodeTransformer

    class GenerationTag(Extension):
        """``{% generation %}``: marks assistant text for training; renders its body."""

        tags = {"generation"}  # noqa: RUF012 - the type Extension declares

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Guard(NodeTransformer):
        """Route every loop and every ``~`` through the budget."""

        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = nodes.Call(nodes.EnvironmentAttribute("mullama_iterate"), [node.iter], [], None, None)
            return node

        def visit_Concat(self, node: Any) -> Any:
            node = self.generic_visit(node)
            parts = nodes.Tuple(node.nodes, "load")
            return nodes.Call(nodes.EnvironmentAttribute("mullama_concat"), [parts], [], None, None)

    class WidthCheck(SandboxedFormatter):
        """Checks each field's format spec once its nested fields (``{:{}}``) are filled in, before formatting it."""

        def format_field(self, value: Any, format_spec: str) -> Any:
            _check_format_spec(format_spec)
            return super().format_field(value, format_spec)

    class Sandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, with the budget checked at every step."""

        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
            self.filters = {name: self._guarded(name, function) for name, function in self.filters.items()}
            self.filters["tojson"] = self._guarded("tojson", _tojson)
            self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

        def guard(self, tree: Any) -> Any:
            return Guard().visit(tree)

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # Fail at once rather than return an Undefined that ``if`` would swallow.
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            budget = _BUDGET.get()
            budget.step()
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, str):
                name = getattr(obj, "__name__", "")
                if name in _PADDING_METHODS:
                    _check_arguments(args, kwargs)
                elif name == "replace" and args and args[0] == "":
                    raise _LimitError("replacing the empty string")
            return budget.produced(super().call(context, obj, *args, **kwargs))

        def wrap_str_format(self, value: Any) -> Any:
            # ``str.format`` is wrapped when looked up; its widths are known only when it is called.
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            text, is_map = value.__self__, value.__name__ == "format_map"

            @functools.wraps(wrapped)
            def checked(*args: Any, **kwargs: Any) -> Any:
                if is_map and len(args) == 1:
                    WidthCheck(self).vformat(text, (), args[0])
                else:
                    WidthCheck(self).vformat(text, args, kwargs)
                return wrapped(*args, **kwargs)

            return checked

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _BUDGET.get()
            budget.step()
            if operator == "%":
                _check_percent_format(left, right)
            elif operator == "*":
                _check_product(left, right)
            elif operator == "**" and _power_too_large(left, right):
                raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
            return budget.produced(super().call_binop(context, operator, left, right))

        def mullama_iterate(self, iterable: Any) -> Any:
            budget = _BUDGET.get()
            for item in iterable:
                budget.step()
                yield item

        def mullama_concat(self, parts: tuple[Any, ...]) -> str:
            budget = _BUDGET.get()
            pieces = [budget.produced(str(part)) for part in parts]
            return budget.produced("".join(pieces))

        def _guarded(self, name: str, function: Any) -> Any:
            # Context- and environment-taking filters get that first; the value comes next.
            skip = 2 if hasattr(function, "jinja_pass_arg") else 1

            @functools.wraps(function)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                budget = _BUDGET.get()
                budget.step()
                if name in _SIZED_FILTERS:
                    _check_arguments(args[skip:], kwargs)
                elif name == "format" and args:
                    _check_percent_format(args[0], kwargs or tuple(args[1:]))
                elif name == "replace" and len(args) > skip and args[skip] == "":
                    raise _LimitError("replacing the empty string")
                return budget.produced(function(*args, **kwargs))

            return guarded

    return Sandbox()


def _check_product(left: Any, right: Any) -> None:
    if isinstance(right, (str, list, tuple)):
        left, right = right, left
    if isinstance(left, (str, list, tuple)) and isinstance(right, int) and len(left) * right > MAX_VALUE_SIZE:
        raise _LimitError(f"a value longer than {MAX_VALUE_SIZE}")
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")


def _power_too_large(base: Any, exponent: Any) -> bool:
    return isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and base.bit_length() * exponent > MAX_INT_BITS
