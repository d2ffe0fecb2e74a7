"""The multipart/form-data parser: forms as httpx (the openai SDK's transport) writes them, and garbage."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.http.multipart import MAX_PARTS, Part, boundary_of, parse_form

#: Names without control characters or quotes: browsers and httpx percent-encode those (HTML's form encoding).
NAME_CHARACTERS = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters='"\\%/')
FIELD_NAMES = st.text(NAME_CHARACTERS, min_size=1, max_size=20)
VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=60)


def encoded(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A form as httpx encodes it: the body and its Content-Type."""
    request = httpx.Request("POST", "http://127.0.0.1/", data=fields or None, files=files or {"": ("", b"")})
    return request.read(), request.headers["Content-Type"]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(FIELD_NAMES, VALUES, max_size=5), st.binary(max_size=3000), FIELD_NAMES)
def test_a_form_written_by_httpx_reads_back(fields, data, filename):
    fields.pop("file", None)
    body, content_type = encoded(fields, {"file": (filename, data)})
    parts = parse_form(body, content_type)
    assert {p.name: p.text() for p in parts if p.name != "file"} == fields
    (upload,) = [p for p in parts if p.name == "file"]
    # Header parameters lose surrounding blanks, as email's parser reads them.
    assert upload.data == data and upload.filename == filename.strip()


def test_a_file_that_contains_boundary_like_bytes_is_kept_whole():
    boundary = "XyZ"
    # The delimiter is CRLF, "--" and the boundary: without the CRLF, or with another character, it is data.
    data = b"x--XyZ--XyZ\r\n-- XyZ\r\n-XyZ\r\n--Xy"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    (part,) = parse_form(body, f"multipart/form-data; boundary={boundary}")
    assert part == Part("file", data, "a.wav", "audio/wav")


def test_preamble_padding_and_epilogue_are_allowed():
    body = (b"preamble\r\n--b \t\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\nepilogue")
    assert parse_form(body, 'multipart/form-data; boundary="b"') == [Part("x", b"1")]


def test_rfc_2231_file_names():
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''r%C3%A9sum%C3%A9.wav\r\n\r\n"
            b"abc\r\n--b--")
    assert parse_form(body, "multipart/form-data; boundary=b")[0].filename == "résumé.wav"


@pytest.mark.parametrize("body,content_type,message", [
    (b"", "application/json", "multipart/form-data"),
    (b"", "multipart/form-data", "boundary"),
    (b"", "multipart/form-data; boundary=" + "a" * 71, "boundary"),
    (b"nothing here", "multipart/form-data; boundary=b", "never appears"),
    (b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nvalue", "multipart/form-data; boundary=b", "closing"),
    (b"--bX\r\n", "multipart/form-data; boundary=b", "CRLF"),
    (b"--b\r\n\r\nvalue\r\n--b--", "multipart/form-data; boundary=b", "Content-Disposition"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b", "Content-Disposition"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b", "field name"),
    (b"--b\r\nContent-Disposition: form-data; name=x\r\nv\r\n--b--", "multipart/form-data; boundary=b",
     "blank line"),
    (b"--b\r\nContent-Disposition: attachment; name=x\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b",
     "form-data"),
])
def test_malformed_forms_are_bad_requests_that_say_why(body, content_type, message):
    with pytest.raises(BadRequestError, match=message):
        parse_form(body, content_type)


def test_too_many_parts_are_refused():
    part = b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n"
    with pytest.raises(BadRequestError, match="parts"):
        parse_form(part * (MAX_PARTS + 1) + b"--b--", "multipart/form-data; boundary=b")


def test_a_field_that_is_not_utf8_is_a_bad_request_naming_it():
    (part,) = parse_form(b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\n\xff\r\n--b--",
                         "multipart/form-data; boundary=b")
    with pytest.raises(BadRequestError, match="model"):
        part.text()


def test_the_boundary_is_read_from_quoted_parameters():
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="a b:c"') == b"a b:c"


PIECES = st.sampled_from([b"--b", b"--b--", b"\r\n", b"\r\n\r\n", b"Content-Disposition: form-data; name=x",
                          b'; filename="f"', b"Content-Disposition:", b"name=", b"\x00", b" ", b"\t", b"\xff",
                          b"=?utf-8?q?x?=", b"filename*=UTF-8''%ff"])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES | st.binary(max_size=8), max_size=30), st.sampled_from(
    ["multipart/form-data; boundary=b", "multipart/form-data; boundary=\"b\"", "multipart/form-data",
     "multipart/form-data; boundary=", "text/plain; boundary=b", "multipart/form-data; boundary=b; boundary=c"]))
def test_garbage_is_a_form_or_a_bad_request_never_another_error(pieces, content_type):
    try:
        parts = parse_form(b"".join(pieces), content_type)
    except BadRequestError:
        return
    for part in parts:
        assert part.name and isinstance(part.data, bytes)
        try:
            part.text()
        except BadRequestError:
            pass
