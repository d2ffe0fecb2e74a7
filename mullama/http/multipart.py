"""``multipart/form-data`` bodies (RFC 7578), parsed with the standard library only.

OpenAI's audio routes take their file and fields as a multipart form. The
body is already in memory (its size was limited when it was read); this
splits it at the boundary strictly, reads each part's headers with
:mod:`email`'s header parser (which knows quoting and RFC 2231 file names),
and bounds the number of parts and the size of their headers. Anything that
is not a well-formed form is a :class:`BadRequestError` saying what is
wrong, never another exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value

from mullama.errors import BadRequestError

#: More parts than any form a client sends; past it the body is refused.
MAX_PARTS = 256
#: The most bytes of headers one part may have.
MAX_PART_HEADERS = 16 * 1024
#: RFC 2046: 1 to 70 characters from this set, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


@dataclass(frozen=True)
class Part:
    """One field of a form: its name, and for a file its file name and type."""

    name: str
    data: bytes
    #: The file name a file part carries; None for a plain field.
    filename: str | None = None
    content_type: str = "text/plain"

    def text(self) -> str:
        """A plain field's value (UTF-8)."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"form field {self.name!r} is not UTF-8 text", param=self.name) from None


def boundary_of(content_type: str | None) -> bytes:
    """The boundary a ``multipart/form-data`` Content-Type names; 400 when it is not such a type."""
    header = Message()
    header["Content-Type"] = content_type or ""
    if header.get_content_type() != "multipart/form-data":
        raise BadRequestError("the body must be multipart/form-data (a file upload form)")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not _BOUNDARY.fullmatch(boundary):
        raise BadRequestError("multipart/form-data needs a valid boundary parameter")
    return boundary.encode("ascii")


def parse_form(body: bytes, content_type: str | None) -> list[Part]:
    """The parts of a ``multipart/form-data`` body, in order."""
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise BadRequestError("multipart body: the boundary never appears")
        position = found + 2 + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):
            return parts  # the closing delimiter; an epilogue after it is ignored, as RFC 2046 says
        position = _skip_padding(body, position)
        if not body.startswith(b"\r\n", position):
            raise BadRequestError("multipart body: a boundary line must end with CRLF")
        start = position + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise BadRequestError("multipart body: it ends without its closing boundary")
        if len(parts) == MAX_PARTS:
            raise BadRequestError(f"multipart body: more than {MAX_PARTS} parts")
        parts.append(_part(body[start:end]))
        position = end + 2 + len(delimiter)


def _skip_padding(body: bytes, position: int) -> int:
    """Past the spaces and tabs a sender may put after a boundary (RFC 2046's transport padding)."""
    while position < len(body) and body[position] in b" \t":
        position += 1
    return position


def _part(raw: bytes) -> Part:
    if raw.startswith(b"\r\n"):
        raise BadRequestError("multipart body: a part without a Content-Disposition header")
    split = raw.find(b"\r\n\r\n")
    if split < 0:
        raise BadRequestError("multipart body: a part's headers do not end with a blank line")
    if split > MAX_PART_HEADERS:
        raise BadRequestError(f"multipart body: a part has more than {MAX_PART_HEADERS} bytes of headers")
    # RFC 7578 lets header values (file names) be UTF-8, as browsers and httpx send them.
    headers = HeaderParser(policy=compat32).parsestr(raw[:split + 4].decode("utf-8", "replace"))
    if headers.defects or any(not _is_header_name(key) for key in headers.keys()):
        raise BadRequestError("multipart body: a part has malformed headers")
    disposition = headers.get_all("Content-Disposition") or []
    if len(disposition) != 1 or headers.get_content_disposition() != "form-data":
        raise BadRequestError("multipart body: each part needs one Content-Disposition: form-data header")
    name = _text(headers.get_param("name", header="content-disposition"))
    if not name:
        raise BadRequestError("multipart body: a part without a field name")
    filename = headers.get_filename()
    return Part(name=name, data=raw[split + 4:], filename=None if filename is None else _text(filename),
                content_type=headers.get_content_type())


def _text(value: object) -> str:
    """A header parameter as text, RFC 2231 values (``filename*=UTF-8''...``) collapsed."""
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return value if isinstance(value, str) else ""


def _is_header_name(key: str) -> bool:
    return bool(key) and all(33 <= ord(c) <= 126 and c != ":" for c in key)
