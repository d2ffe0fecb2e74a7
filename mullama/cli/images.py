"""Image files named in a ``mullama run`` prompt, attached as ``ollama run`` attaches them.

For a model that sees images, a prompt such as ``what is in ./photo.png`` or
``compare '~/My Pictures/a.jpg' and /tmp/b.png`` sends the files as images
and the rest as text. A path is absolute, relative with ``./`` or ``../``,
or starts with ``~``; one with spaces is quoted or has them escaped
(``\\ ``). A file that does not exist is a one-line error rather than a
prompt silently sent without its picture.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TextIO

from mullama.errors import BadRequestError

#: The extensions whose paths are taken for images.
EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")

_EXT = "|".join(EXTENSIONS)
_PATH = re.compile(
    rf"""'(?P<single>[^']+\.(?:{_EXT}))'"""
    rf'''|"(?P<double>[^"]+\.(?:{_EXT}))"'''
    rf"""|(?<![\w/.~:])(?P<bare>(?:~|\.\.?)?/(?:\\ |[^\s'"])+?\.(?:{_EXT}))(?![\w.])""",
    re.IGNORECASE)


def find_image_paths(prompt: str) -> list[tuple[str, Path]]:
    """Each image path in ``prompt``: the text that names it, and the file it names."""
    found = []
    for match in _PATH.finditer(prompt):
        text = match.group("single") or match.group("double") or match.group("bare").replace("\\ ", " ")
        found.append((match.group(0), Path(text).expanduser()))
    return found


def attach_images(prompt: str, err: TextIO) -> tuple[str, list[str]]:
    """``prompt`` without the image paths it names, and those images base64-encoded, in order.

    Reports each image attached on ``err`` (as ``ollama run`` does); raises
    :class:`BadRequestError` for a path that names no readable file.
    """
    images = []
    for named, path in find_image_paths(prompt):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadRequestError(f"couldn't find image {str(path)!r}: no such file") from None
        except OSError as exc:
            raise BadRequestError(f"couldn't read image {str(path)!r}: {exc.strerror or exc}") from None
        err.write(f"Added image '{path}'\n")
        images.append(base64.b64encode(data).decode())
        prompt = prompt.replace(named, "", 1)
    return prompt.strip() if images else prompt, images
