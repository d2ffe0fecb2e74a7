"""Tests of the streaming thinking splitter."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.prompt.thinking import ThinkingSplitter, prompt_opens_thinking, split_thinking


def stream(splitter: ThinkingSplitter, chunks: list[str]) -> list[tuple[str, str]]:
    """Feed every chunk, flush, and return all pieces."""
    pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)]
    return pieces + splitter.flush()


def joined(pieces: list[tuple[str, str]]) -> tuple[str, str]:
    """The thinking and content texts of a list of pieces."""
    return (
        "".join(text for kind, text in pieces if kind == "thinking"),
        "".join(text for kind, text in pieces if kind == "content"),
    )


def chunked(text: str, cuts: list[int]) -> list[str]:
    """Cut ``text`` at the given positions."""
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize(
    ("text", "starts_inside", "expected"),
    [
        ("<think>\nLet me see.\n</think>\n\nParis.", False, ("Let me see.\n", "Paris.")),
        ("  <think>a</think>b", False, ("a", "b")),
        ("Hello <think>x</think>", False, ("", "Hello <think>x</think>")),
        ("\n\nno thinking here", False, ("", "\n\nno thinking here")),
        ("<think>unfinished", False, ("unfinished", "")),
        ("reasoning</think>\nanswer", True, ("reasoning", "answer")),
        ("<think>r</think>a", True, ("r", "a")),
        ("all thinking", True, ("all thinking", "")),
        ("<think>a</think>b<think>c</think>", False, ("a", "b<think>c</think>")),
        ("<th", False, ("", "<th")),
        ("", False, ("", "")),
    ],
)
def test_split_examples(text: str, starts_inside: bool, expected: tuple[str, str]) -> None:
    assert split_thinking(text, starts_inside=starts_inside) == expected
    splitter = ThinkingSplitter(starts_inside=starts_inside)
    assert joined(stream(splitter, list(text))) == expected


def test_partial_tags_are_held_back() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("<th") == []
    assert splitter.feed("ink>") == []
    assert splitter.feed("\nstep one </th") == [("thinking", "step one ")]
    assert splitter.feed("ink>") == []
    assert splitter.feed("\n The answer") == [("content", "The answer")]
    assert splitter.feed(" is 4.") == [("content", " is 4.")]
    assert splitter.flush() == []


def test_a_false_partial_tag_is_released() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("<th") == []
    assert splitter.feed("e cat>") == [("content", "<the cat>")]


def test_pieces_of_one_feed_are_merged_and_ordered() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("<think>a</think>b") == [("thinking", "a"), ("content", "b")]


def test_custom_tags() -> None:
    splitter = ThinkingSplitter("<|START_THINKING|>", "<|END_THINKING|>")
    pieces = stream(splitter, ["<|START_THI", "NKING|>plan<|END_", "THINKING|>done"])
    assert pieces == [("thinking", "plan"), ("content", "done")]


def test_empty_tags_are_refused() -> None:
    with pytest.raises(ValueError):
        ThinkingSplitter("", "</think>")


def test_prompt_opens_thinking() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# Text drawn mostly from tag fragments and whitespace, so tags, partial tags
# and leading whitespace are frequent.
fragments = st.sampled_from(["<think>", "</think>", "<th", "ink>", "</", "<", ">", " ", "\n", "a", "b c", "é"])
texts = st.one_of(st.text(max_size=40), st.lists(fragments, max_size=12).map("".join))


@settings(max_examples=400, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8), starts_inside=st.booleans())
def test_any_chunking_matches_the_whole_split(text: str, cuts: list[int], starts_inside: bool) -> None:
    splitter = ThinkingSplitter(starts_inside=starts_inside)
    pieces = stream(splitter, chunked(text, cuts))
    assert joined(pieces) == split_thinking(text, starts_inside=starts_inside)
    assert all(piece for _, piece in pieces)


@settings(max_examples=200, deadline=None)
@given(
    thinking=st.text(st.characters(blacklist_characters="<"), max_size=30).map(str.lstrip),
    content=st.text(max_size=30),
    cuts=st.lists(st.integers(0, 100), max_size=6),
)
def test_nothing_is_lost_but_trimmed_whitespace(thinking: str, content: str, cuts: list[int]) -> None:
    text = f"<think>{thinking}</think>{content}"
    pieces = stream(ThinkingSplitter(), chunked(text, cuts))
    assert joined(pieces) == (thinking, content.lstrip())
