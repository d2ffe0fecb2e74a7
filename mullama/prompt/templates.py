"""Chat prompts rendered from a Modelfile ``TEMPLATE`` exactly as Ollama renders them.

This follows Ollama's ``template/template.go`` and ``server/prompt.go``: the
template sees a map with ``System``, ``Messages``, ``Tools``, ``Response``,
``Think``, ``ThinkLevel`` and ``IsThinkSet`` when it mentions ``.Messages``;
otherwise it is a legacy template, executed once per user turn with
``.System``, ``.Prompt`` and ``.Response``, the last time cut right after
``.Response`` so a trailing assistant message is continued rather than closed.

The values carry Go's field names and Go's quirks: numbers in tool arguments
are float64, ``{{ .Function.Arguments }}`` and ``{{ .Tools }}`` print as JSON,
maps range in key order, and images become ``[img-N]`` tags in the content.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mullama.prompt.gotemplate import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    Template,
    TemplateError,
    TemplateNode,
    VariableNode,
    marshal_json,
    sprint,
)
from mullama.types import THINK_LEVELS, Message, Tool


# ---------------------------------------------------------------- Go-shaped values


class GoSlice(list):
    """A Go slice that remembers whether it is nil: JSON ``null`` then, ``[]`` when empty."""

    def __init__(self, items: Iterable[Any] | None = None) -> None:
        super().__init__(() if items is None else items)
        self.is_nil = items is None

    def __go_json__(self) -> str:
        return "null" if self.is_nil else marshal_json(list(self))


class JSONSlice(GoSlice):
    """A slice whose ``String`` method prints it as JSON (Ollama's ``templateTools``)."""

    def __str__(self) -> str:
        return self.__go_json__()


class JSONMap(dict):
    """A map whose ``String`` method prints it as JSON (``templateArgs``, ``templateProperties``)."""

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        super().__init__({} if items is None else items)
        self.is_nil = items is None

    def __str__(self) -> str:
        if self.is_nil:
            return "{}"
        try:
            return marshal_json(dict(self))
        except ValueError:
            return ""

    def __go_json__(self) -> str:
        return "null" if self.is_nil else marshal_json(dict(self))


class PropertyType(list):
    """A JSON Schema ``type``: one name, or several (Ollama's ``api.PropertyType``)."""

    def __str__(self) -> str:
        if len(self) == 1:
            return self[0]
        return sprint(list(self)) if self else ""

    def __go_json__(self) -> str:
        return marshal_json(self[0]) if len(self) == 1 else marshal_json(list(self) or None)


class OrderedProperties(dict):
    """Nested schema properties, which Ollama keeps in their given order."""

    def __go_json__(self) -> str:
        return "{" + ",".join(f"{marshal_json(k)}:{marshal_json(v)}" for k, v in self.items()) + "}"


@dataclass
class ToolProperty:
    """One schema property as Ollama decodes it (``api.ToolProperty``); other keys are dropped."""

    AnyOf: list[ToolProperty] = field(metadata={"json": "anyOf,omitempty"})
    Type: PropertyType = field(metadata={"json": "type,omitempty"})
    Items: Any = field(metadata={"json": "items,omitempty"})
    Description: str = field(metadata={"json": "description,omitempty"})
    Enum: list[Any] = field(metadata={"json": "enum,omitempty"})
    Properties: OrderedProperties | None = field(metadata={"json": "properties,omitempty"})
    Required: list[str] = field(metadata={"json": "required,omitempty"})

    def to_typescript_type(self) -> str:
        """The property's type in TypeScript notation (for ``toTypeScriptType``)."""
        if self.AnyOf:
            return " | ".join(p.to_typescript_type() for p in self.AnyOf)
        if not self.Type:
            return "any"
        return " | ".join(_TYPESCRIPT.get(t, "any") for t in self.Type)


_TYPESCRIPT = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "array": "any[]",
    "object": "Record<string, any>",
    "null": "null",
}


@dataclass
class ToolParameters:
    """A tool's parameter schema (``templateToolFunctionParameters``)."""

    Type: str = field(metadata={"json": "type"})
    Defs: Any = field(metadata={"json": "$defs,omitempty"})
    Items: Any = field(metadata={"json": "items,omitempty"})
    Required: list[str] = field(metadata={"json": "required,omitempty"})
    Properties: JSONMap = field(metadata={"json": "properties"})


@dataclass
class ToolFunction:
    """A tool's function (``templateToolFunction``)."""

    Name: str = field(metadata={"json": "name"})
    Description: str = field(metadata={"json": "description"})
    Parameters: ToolParameters = field(metadata={"json": "parameters"})


@dataclass
class TemplateTool:
    """A tool as templates see it; prints as its JSON (``templateTool``)."""

    Type: str = field(metadata={"json": "type"})
    Items: Any = field(metadata={"json": "items,omitempty"})
    Function: ToolFunction = field(metadata={"json": "function"})

    def __str__(self) -> str:
        return marshal_json(self)


@dataclass
class ToolCallFunction:
    """The function part of a tool call (``templateToolCallFunction``)."""

    Index: int
    Name: str
    Arguments: JSONMap


@dataclass
class TemplateToolCall:
    """A tool call as templates see it (``templateToolCall``)."""

    ID: str
    Function: ToolCallFunction


@dataclass
class TemplateMessage:
    """A message as templates see it (``templateMessage``)."""

    Role: str
    Content: str
    Thinking: str
    Images: GoSlice
    ToolCalls: GoSlice
    ToolName: str
    ToolCallID: str


def _go_numbers(value: Any) -> Any:
    """Decoded-JSON values as Go holds them: every number is a float64."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _go_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_go_numbers(v) for v in value]
    return value


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []


def _property(schema: Any) -> ToolProperty:
    if not isinstance(schema, Mapping):
        return ToolProperty(AnyOf=[], Type=PropertyType(), Items=None, Description="", Enum=[],
                            Properties=None, Required=[])
    kind = schema.get("type")
    nested = schema.get("properties")
    any_of = schema.get("anyOf")
    description = schema.get("description")
    enum = schema.get("enum")
    return ToolProperty(
        AnyOf=[_property(p) for p in any_of] if isinstance(any_of, list) else [],
        Type=PropertyType([kind] if isinstance(kind, str) else _strings(kind)),
        Items=_go_numbers(schema.get("items")),
        Description=description if isinstance(description, str) else "",
        Enum=GoSlice(_go_numbers(enum)) if isinstance(enum, list) else GoSlice(),
        Properties=(
            OrderedProperties({str(k): _property(v) for k, v in nested.items()})
            if isinstance(nested, Mapping) else None
        ),
        Required=_strings(schema.get("required")),
    )


def template_tool(tool: Tool) -> TemplateTool:
    """``tool`` as Ollama shows it to templates."""
    params = tool.parameters if isinstance(tool.parameters, Mapping) else {}
    kind = params.get("type")
    properties = params.get("properties")
    return TemplateTool(
        Type="function",
        Items=None,
        Function=ToolFunction(
            Name=tool.name,
            Description=tool.description,
            Parameters=ToolParameters(
                Type=kind if isinstance(kind, str) else "",
                Defs=_go_numbers(params.get("$defs")),
                Items=_go_numbers(params.get("items")),
                Required=_strings(params.get("required")),
                Properties=(
                    JSONMap({str(k): _property(v) for k, v in properties.items()})
                    if isinstance(properties, Mapping) else JSONMap(None)
                ),
            ),
        ),
    )


def template_message(message: Message) -> TemplateMessage:
    """``message`` as Ollama shows it to templates."""
    calls = [
        TemplateToolCall(
            ID=call.id,
            Function=ToolCallFunction(Index=call.index, Name=call.name, Arguments=JSONMap(_go_numbers(call.arguments))),
        )
        for call in message.tool_calls
    ]
    return TemplateMessage(
        Role=message.role,
        Content=message.content,
        Thinking=message.thinking,
        Images=GoSlice(list(message.images) or None),
        ToolCalls=GoSlice(calls or None),
        ToolName=message.tool_name,
        ToolCallID=message.tool_call_id,
    )


# ---------------------------------------------------------------- Ollama's template handling


def _identifiers(node: Node) -> list[str]:
    """The field and variable names a tree mentions (Ollama's ``Identifiers``)."""
    if isinstance(node, ListNode):
        return [name for child in node.nodes for name in _identifiers(child)]
    if isinstance(node, TemplateNode):
        if node.pipe is None:
            raise TemplateError("undefined template specified")
        return _identifiers(node.pipe)
    if isinstance(node, ActionNode):
        return _identifiers(node.pipe)
    if isinstance(node, BranchNode):
        names = _identifiers(node.pipe) + _identifiers(node.body)
        return names + (_identifiers(node.else_body) if node.else_body is not None else [])
    if isinstance(node, PipeNode):
        return [name for cmd in node.cmds for arg in cmd.args for name in _identifiers(arg)]
    if isinstance(node, (FieldNode, VariableNode)):
        return list(node.ident)
    return []


def template_vars(template: Template) -> set[str]:
    """Every identifier the template and its definitions mention, lower-cased."""
    return {name.lower() for tree in template.trees.values() for name in _identifiers(tree)}


def _response_action() -> ActionNode:
    return ActionNode(0, PipeNode(0, [], False, [CommandNode(0, [FieldNode(0, ["Response"])])]))


def parse_template(text: str) -> Template:
    """Parse a Modelfile template as Ollama does (``template.Parse``).

    A template that mentions neither ``.Messages`` nor ``.Response`` gets a
    ``{{ .Response }}`` appended to its end.
    """
    template = Template.parse(text, missingkey="zero")
    names = template_vars(template)
    if "messages" not in names and "response" not in names:
        root = template.root
        template.trees[template.name] = ListNode(root.pos, [*root.nodes, _response_action()])
    return template


class _ResponseCut:
    """Drops everything after the first ``.Response`` field (Ollama's ``deleteNode``)."""

    def __init__(self) -> None:
        self.cut = False

    def _drop(self, node: Node) -> bool:
        if isinstance(node, FieldNode) and "Response" in node.ident:
            self.cut = True
            return False
        return self.cut

    def walk(self, node: Node) -> Node | None:
        if self._drop(node):
            return None
        if isinstance(node, ListNode):
            kept = (self.walk(child) for child in node.nodes)
            return ListNode(node.pos, [child for child in kept if child is not None])
        if isinstance(node, BranchNode):
            body = self.walk(node.body)
            else_body = None
            if node.else_body is not None:
                if self.cut:
                    # Ollama panics here: the walk drops the else branch it then dereferences.
                    raise TemplateError("template: cannot continue a response inside an if/else")
                else_body = self.walk(node.else_body)
            return type(node)(node.pos, node.pipe, body, else_body)
        if isinstance(node, ActionNode):
            pipe = self.walk(node.pipe)
            return None if pipe is None else ActionNode(node.pos, pipe)
        if isinstance(node, PipeNode):
            cmds = []
            for cmd in node.cmds:
                args = [kept for kept in (self.walk(arg) for arg in cmd.args) if kept is not None]
                if not args:
                    return None
                cmds.append(CommandNode(cmd.pos, args))
            return PipeNode(node.pos, node.decl, node.is_assign, cmds) if cmds else None
        return node


def collate(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """Merge consecutive same-role messages (tool results excepted) and gather the system text."""
    system: list[str] = []
    collated: list[Message] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
        if collated and collated[-1].role == message.role and message.role != "tool":
            collated[-1].content += "\n\n" + message.content
        else:
            collated.append(dataclasses.replace(message))
    return "\n\n".join(system), collated


def _tag_images(messages: Sequence[Message]) -> list[Message]:
    """Put an ``[img-N]`` tag for each image in its message's content, numbering across the chat."""
    tagged = []
    count = 0
    for message in messages:
        prefix, content = "", message.content
        for _ in message.images:
            tag = f"[img-{count}]"
            count += 1
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        tagged.append(dataclasses.replace(message, content=prefix + content))
    return tagged


@dataclass
class _Values:
    """Ollama's ``template.Values``."""

    messages: list[Message] | None
    tools: list[Tool] | None
    prompt: str = ""
    suffix: str = ""
    think: bool = False
    think_level: str = ""
    is_think_set: bool = False

    def thinking(self) -> dict[str, Any]:
        return {"Think": self.think, "ThinkLevel": self.think_level, "IsThinkSet": self.is_think_set}


def _execute(template_text: str, values: _Values) -> str:
    template = parse_template(template_text)
    system, messages = collate(values.messages or [])
    if values.prompt and values.suffix:
        return template.execute({"Prompt": values.prompt, "Suffix": values.suffix, "Response": "", **values.thinking()})
    if "messages" in template_vars(template):
        tools = None if values.tools is None else [template_tool(t) for t in values.tools]
        return template.execute({
            "System": system,
            "Messages": GoSlice(None if values.messages is None else [template_message(m) for m in messages]),
            "Tools": JSONSlice(tools),
            "Response": "",
            **values.thinking(),
        })
    return _execute_legacy(template, messages, values)


def _execute_legacy(template: Template, messages: list[Message], values: _Values) -> str:
    """One execution per user turn, the last one cut after ``.Response``."""
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def execute() -> None:
        out.append(template.execute({**turn, **values.thinking()}))
        turn.update(System="", Prompt="", Response="")

    for message in messages:
        if message.role == "system":
            if turn["Prompt"] or turn["Response"]:
                execute()
            turn["System"] = message.content
        elif message.role == "user":
            if turn["Response"]:
                execute()
            turn["Prompt"] = message.content
        elif message.role == "assistant":
            turn["Response"] = message.content
    cut = _ResponseCut().walk(template.root)
    # Ollama runs the cut tree as a bare template: no custom functions, no definitions.
    last = Template(name="", text=template.text, trees={"": cut or ListNode(0, [])}, funcs={})
    out.append(last.execute({**turn, **values.thinking()}))
    return "".join(out)


def _think_values(think: bool | None, think_level: str) -> tuple[bool, str, bool]:
    if think_level:
        return think_level in THINK_LEVELS, think_level, True
    if think is None:
        return False, "", False
    return think, "medium" if think else "", True


def render_chat(
    template_text: str,
    messages: list[Message],
    tools: list[Tool] | None = None,
    *,
    think: bool | None = None,
    think_level: str = "",
    suffix: str = "",
    response: str = "",
) -> str:
    """Render a conversation with a Modelfile template, byte for byte as Ollama's ``/api/chat``.

    ``think`` is the request's boolean ``think`` (``True`` means level
    ``"medium"``, as in Ollama); a non-empty ``think_level`` is a string
    ``think`` such as ``"high"`` and takes precedence.  ``response`` is
    partial assistant text to continue: it is rendered as a trailing
    assistant message, which is how Ollama continues one.  ``suffix`` is
    passed on as Ollama's ``Values.Suffix``, which only a prompt-and-suffix
    (``/api/generate``) rendering shows to the template.
    """
    turns = list(messages) + ([Message(role="assistant", content=response)] if response else [])
    enabled, level, is_set = _think_values(think, think_level)
    values = _Values(_tag_images(turns), tools, suffix=suffix, think=enabled, think_level=level, is_think_set=is_set)
    try:
        return _execute(template_text, values)
    except RecursionError:
        raise TemplateError("template: data is nested too deeply") from None


def render_generate(
    template_text: str,
    prompt: str,
    system: str = "",
    suffix: str = "",
    response: str = "",
    think: bool | None = None,
    *,
    think_level: str = "",
    images: Sequence[bytes] = (),
    history: Sequence[Message] = (),
) -> str:
    """Render an ``/api/generate`` prompt as Ollama does.

    With a ``suffix`` (fill-in-the-middle) and a prompt, the template sees
    ``.Prompt`` and ``.Suffix``.  Otherwise the prompt becomes a user message
    after the ``system`` message and the Modelfile's ``MESSAGE`` ``history``,
    and is rendered like a chat with no tools.
    """
    enabled, level, is_set = _think_values(think, think_level)
    if suffix:
        values = _Values(None, None, prompt=prompt, suffix=suffix, think=enabled, think_level=level,
                         is_think_set=is_set)
        return _execute(template_text, values)
    turns = [Message(role="system", content=system)] if system else []
    turns += [*history, Message(role="user", content=prompt, images=list(images))]
    return render_chat(template_text, turns, [], think=think, think_level=think_level, response=response)
