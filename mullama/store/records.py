"""What the store says about a model: its files and the Modelfile settings layered on them.

A record is built once per version of a model's manifest and kept in the
store's index, so a request to a model finds it with a stat, not by reading
the manifest and its template, system and parameter layers again. Records
are shared between requests and never changed after they are built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mullama.errors import BadRequestError, ModelNotFoundError, MullamaError
from mullama.options import parse_options
from mullama.speech.model_file import WhisperFile, read_whisper_file
from mullama.store import gguf, kinds
from mullama.store.blobs import MEDIA_TYPES, IndexedManifest, Layer, Store
from mullama.store.registry import locate
from mullama.types import Message


@dataclass(frozen=True)
class ModelRecord:
    """A model as stored: its files and the Modelfile settings layered on it."""

    name: str
    digest: str
    #: The GGUF; the first part when the model is split.
    model_path: Path
    #: Every part of the GGUF in order (just ``model_path`` unless split).
    model_paths: list[Path] = field(default_factory=list)
    projector_path: Path | None = None
    #: A draft model for speculative decoding (a Modelfile's DRAFT), stored as Ollama stores it.
    draft_path: Path | None = None
    adapters: list[Path] = field(default_factory=list)
    #: A Go template from the Modelfile's TEMPLATE; None means the GGUF's own.
    template: str | None = None
    system: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    #: The model this one was created from (Ollama's ``details.parent_model``); "" when made from files.
    parent_model: str = ""
    #: The Ollama version the model asks for (a Modelfile's REQUIRES), as its config records it.
    requires: str = ""
    #: Ollama's built-in prompt renderer and output parser named by the config ("" for the template's own).
    renderer: str = ""
    parser: str = ""
    size: int = 0
    modified: float = 0.0
    #: What the model file holds: :data:`kinds.GGUF`, or :data:`kinds.WHISPER` for a speech model.
    kind: str = kinds.GGUF
    #: Reads a GGUF header; a store's records share its cache (:meth:`Store.gguf_info`).
    read_header: Callable[[Path], gguf.GGUFInfo] = field(default=gguf.read_gguf, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_paths:
            object.__setattr__(self, "model_paths", [self.model_path])

    @property
    def info(self) -> gguf.GGUFInfo:
        """The header of the GGUF (its first part), read once per file rather than once per use."""
        return self.read_header(self.model_path)

    @property
    def speech(self) -> bool:
        """Whether this is a speech-to-text model (whisper.cpp's format) rather than a GGUF."""
        return self.kind == kinds.WHISPER

    @cached_property
    def whisper(self) -> WhisperFile:
        """A speech model's validated header, read once per record."""
        return read_whisper_file(self.model_path)

    def headers(self) -> list[gguf.GGUFInfo]:
        """The header of every part of the GGUF, in order."""
        return [self.read_header(path) for path in self.model_paths]


def find_model(store: Store, text: str) -> ModelRecord:
    """The record for ``text`` (a name in the store, or a local ``.gguf`` path).

    For a model the store's index already holds this costs a stat of its
    manifest (and of any GGUF it references in place), and reads no file.
    """
    located = locate(text)
    if located.path is not None:
        stat = located.path.stat()
        return ModelRecord(name=str(located.path), digest="", model_path=located.path, size=stat.st_size,
                           modified=stat.st_mtime, kind=kinds.file_kind(located.path), read_header=store.gguf_info)
    indexed = store.lookup(located.name)
    if indexed is None:
        raise ModelNotFoundError(text)
    for layer in indexed.manifest.layers:
        if layer.from_path:
            # A file referenced in place may have changed under the record; a blob cannot.
            store.layer_path(layer)
    if indexed.record is None:
        # Built outside the store's lock: two requests may both build it, and either result is right.
        indexed.record = _build(store, indexed)
    return indexed.record


def _build(store: Store, indexed: IndexedManifest) -> ModelRecord:
    """Read the layers of one version of a manifest into a record."""
    parts: list[Path] = []
    fields: dict[str, Any] = {"adapters": [], "license": [], **_config_fields(store, indexed.manifest.config)}
    for layer in indexed.manifest.layers:
        path = store.layer_path(layer)
        kind = layer.media_type.rsplit(".", 1)[-1]
        if layer.media_type == MEDIA_TYPES["model"]:
            if not parts and layer.from_path and not os.path.isabs(layer.from_path):
                fields["parent_model"] = layer.from_path
            parts.append(path)
        elif kind == "projector":
            fields["projector_path"] = path
        elif kind == "draft":
            fields["draft_path"] = path
        elif kind == "adapter":
            fields["adapters"].append(path)
        elif kind == "template":
            fields["template"] = path.read_text()
        elif kind == "system":
            fields["system"] = path.read_text()
        elif kind == "params":
            fields["parameters"] = parse_options(json.loads(path.read_text()))
        elif kind == "messages":
            fields["messages"] = [Message(role=m.get("role", ""), content=m.get("content", ""))
                                  for m in json.loads(path.read_text())]
        elif kind == "license":
            fields["license"].append(path.read_text())
    name = indexed.name.display
    if not parts:
        raise BadRequestError(f"{name} has no model layer")
    return ModelRecord(name=name, digest=indexed.entry.digest, model_path=parts[0], model_paths=parts,
                       size=indexed.manifest.size, modified=indexed.entry.modified, kind=kinds.file_kind(parts[0]),
                       read_header=store.gguf_info, **fields)


def _config_fields(store: Store, config: Layer) -> dict[str, str]:
    """What a record takes from the manifest's config: REQUIRES, RENDERER and PARSER."""
    try:
        data = json.loads(store.layer_path(config).read_bytes())
    except (MullamaError, OSError, ValueError):
        # Mullama's own configs are always readable; one written elsewhere only loses these optional fields.
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: data[key] for key in ("requires", "renderer", "parser") if isinstance(data.get(key), str)}
