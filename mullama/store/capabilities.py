"""What a model can do, as ``/api/show`` and ``/api/tags`` report it in ``capabilities``.

The rules are Ollama's (``server/images.go``: ``Capabilities``), applied to
the prompt source Mullama uses: a Modelfile TEMPLATE (a Go template) when the
model has one, else the GGUF's own chat template.

- ``completion``, or ``embedding`` when the GGUF sets ``{arch}.pooling_type``, or ``rerank`` when that
  pooling type is rank (4): Ollama has no rerankers, so Mullama names their capability as it names the route
  (``/api/rerank``);
- with a Go template: ``tools`` when it mentions ``.Tools``, ``insert`` when
  it mentions ``.Suffix``, ``thinking`` when Ollama's heuristic finds the tags
  around ``.Thinking`` in the loop over ``.Messages``;
- with the GGUF's chat template: ``tools`` when it says ``tools`` or
  ``tool_call``, ``thinking`` when it has ``<think>`` and ``</think>`` (or
  strips earlier reasoning at ``</think>``, as Qwen and DeepSeek templates do);
- ``thinking`` for gpt-oss, and ``tools`` too with the harmony parser;
- ``vision`` only when the model's projector loads, which the caller knows.
"""

from __future__ import annotations

import functools

from mullama.errors import BadRequestError
from mullama.prompt.gotemplate import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    RangeNode,
    TemplateNode,
    TextNode,
)
from mullama.prompt.templates import parse_template, template_vars
from mullama.store.gguf import GGUFInfo
from mullama.store.records import ModelRecord

#: llama.cpp's ``LLAMA_POOLING_TYPE_RANK``: a reranker's pooling type.
RANK_POOLING = 4
#: Architectures whose output is harmony, where Ollama reports thinking whatever the template says.
HARMONY_FAMILIES = ("gptoss", "gpt-oss")


def capabilities(record: ModelRecord, info: GGUFInfo, *, vision: bool) -> list[str]:
    """The ``capabilities`` of ``record`` (``info`` is its GGUF header; ``vision``: its projector loads).

    Listed in the order Ollama finds them.
    """
    found: list[str] = []
    arch = info.architecture or ""
    if record.template is None:
        found += chat_template_capabilities(info.chat_template or "")
    if f"{arch}.pooling_type" not in info.metadata:
        found.append("completion")
    else:
        found.append("rerank" if info.pooling_type == RANK_POOLING else "embedding")
    if vision:
        found.append("vision")
    if record.template is not None:
        found += go_template_capabilities(record.template)
    if record.parser == "harmony":
        found += ["tools", "thinking"]
    if arch in HARMONY_FAMILIES:
        found.append("thinking")
    return list(dict.fromkeys(found))


def chat_template_capabilities(template: str) -> list[str]:
    """What a GGUF's Jinja chat template shows (Ollama's ``chatTemplateCapabilities``)."""
    found = []
    if "tools" in template or "tool_call" in template:
        found.append("tools")
    split_at_close = "content.split('</think>')" in template or 'content.split("</think>")' in template
    if ("<think>" in template and "</think>" in template) or (
            split_at_close and "reasoning_content" not in template and "<SPECIAL_12>" not in template):
        found.append("thinking")
    return found


@functools.lru_cache(maxsize=256)
def go_template_capabilities(text: str) -> tuple[str, ...]:
    """What a Go template shows (Ollama's ``goTemplateCapabilities``); nothing when it does not parse.

    Kept per template text: ``/api/tags`` asks for every model at each listing.
    """
    try:
        template = parse_template(text)
        names = template_vars(template)
    except BadRequestError:
        return ()
    found = [capability for var, capability in (("tools", "tools"), ("suffix", "insert")) if var in names]
    opening, closing = thinking_tags(template.root)
    if opening and closing:
        found.append("thinking")
    return tuple(found)


def thinking_tags(root: ListNode) -> tuple[str, str]:
    """The text around ``.Thinking`` in a ``range`` over ``.Messages`` (Ollama's ``thinking.InferTags``).

    For each such ``.Thinking``, the nearest enclosing list's first and last
    nodes, when they are text, give the opening and closing tags; a later
    match overrides an earlier one, as in Ollama.
    """
    tags = ["", ""]
    ancestors: list[Node] = []

    def visit(node: Node | None) -> None:
        if node is None:
            return
        ancestors.append(node)
        if isinstance(node, FieldNode) and node.ident and node.ident[0] == "Thinking":
            _note_tags(ancestors, tags)
        for child in _children(node):
            visit(child)
        ancestors.pop()

    visit(root)
    return tags[0], tags[1]


def _note_tags(ancestors: list[Node], tags: list[str]) -> None:
    loop = next((node for node in reversed(ancestors) if isinstance(node, RangeNode)), None)
    if loop is None or not _mentions_field(loop.pipe, "Messages"):
        return
    enclosing = next((node for node in reversed(ancestors) if isinstance(node, ListNode)), None)
    if enclosing is None or not enclosing.nodes:
        return
    first, last = enclosing.nodes[0], enclosing.nodes[-1]
    if isinstance(first, TextNode):
        tags[0] = first.text.strip()
    if isinstance(last, TextNode):
        tags[1] = last.text.strip()


def _mentions_field(pipe: PipeNode, name: str) -> bool:
    found = False

    def visit(node: Node | None) -> None:
        nonlocal found
        if isinstance(node, FieldNode) and node.ident and node.ident[0] == name:
            found = True
        for child in _children(node) if node is not None else ():
            visit(child)

    visit(pipe)
    return found


def _children(node: Node) -> list[Node | None]:
    """The nodes Go's ``parse`` walk in Ollama's ``templateVisit`` descends into, in its order."""
    if isinstance(node, ListNode):
        return list(node.nodes)
    if isinstance(node, BranchNode):
        return [node.pipe, node.body, node.else_body]
    if isinstance(node, ActionNode):
        return [node.pipe]
    if isinstance(node, TemplateNode):
        return [node.pipe]
    if isinstance(node, PipeNode):
        return list(node.cmds)
    if isinstance(node, CommandNode):
        return list(node.args)
    return []
