"""Creating a model: the layers of a base model or of uploaded files, with Modelfile settings on top.

This is Ollama's ``CreateHandler`` below its wire format: the base named by
``FROM`` is pulled when the store lacks it (its progress joins the create's),
its layers are reused with the base's name as their ``from`` (Ollama's parent
model), a ``DRAFT`` is stored as Ollama's draft layer, ``REQUIRES`` is checked
against the Ollama version Mullama answers as, and ``RENDERER``/``PARSER`` are
kept only where Mullama does what they name, else refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mullama.errors import BadRequestError, MullamaError, NotFoundError
from mullama.prompt.toolcalls import HARMONY, detect_format
from mullama.store import gguf, kinds
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store
from mullama.store.modelfile import check_requires
from mullama.store.names import ModelName, canonical_digest
from mullama.store.registry import locate

Progress = Callable[[dict[str, Any]], None]
#: ``pull(name, emit)``: fetch a model into the store, return the name it is stored under.
Pull = Callable[[str, Progress], ModelName]
#: ``quantize(source, destination, level)``: write a GGUF re-quantized.
Quantize = Callable[[Path, Path, str], None]

#: Ollama's built-in renderers and parsers that Mullama has, by kind and name, with the output format each is for:
#: the harmony parser of gpt-oss (Ollama has no harmony renderer: it renders gpt-oss with its template).
_HONOURED: dict[str, dict[str, str]] = {"renderer": {}, "parser": {"harmony": HARMONY}}


@dataclass
class CreateSpec:
    """What an ``/api/create`` request asks for, its paths already allowed by the API layer."""

    name: ModelName
    #: ``FROM`` a model name ("" when made from files).
    base: str = ""
    #: ``FROM`` a GGUF on the server: copied in, or with ``in_place`` referenced where it lies.
    source_file: Path | None = None
    in_place: bool = False
    #: Uploaded blobs by file name: the model (and projector) files, adapters, the draft model.
    files: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    draft_files: dict[str, str] = field(default_factory=dict)
    quantize: str = ""
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: MESSAGE lines as stored (role and content).
    messages: list[dict[str, str]] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    renderer: str = ""
    parser: str = ""
    requires: str = ""


def create(store: Store, spec: CreateSpec, emit: Progress, *, pull: Pull, quantize: Quantize,
           ollama_version: str) -> None:
    """Write the manifest ``spec`` describes, reporting progress as Ollama's create stream does."""
    check_requires(spec.requires, ollama_version)
    config: dict[str, Any] = {}
    layers = _base_layers(store, spec, emit, config, pull)
    uploaded = _blob_layers(store, spec.files, emit)
    if layers and any(layer.media_type == MEDIA_TYPES["model"] for layer in uploaded):
        raise BadRequestError("'from' names a model and 'files' holds another: give one (a file beside 'from' may "
                              "only be a projector)", param="files")
    layers += uploaded
    layers += [_uploaded(store, digest, f"adapter {filename}", "adapter", "adapters")
               for filename, digest in spec.adapters.items()]
    if spec.draft_files:
        layers = [layer for layer in layers if layer.media_type != MEDIA_TYPES["draft"]]
        layers += _draft_layers(store, spec.draft_files, emit, config)
    models = [layer for layer in layers if layer.media_type == MEDIA_TYPES["model"]]
    if not models:
        raise BadRequestError("neither 'from' nor 'files' was specified", param="from")
    if kinds.file_kind(store.layer_path(models[0])) == kinds.WHISPER:
        if spec.quantize or spec.renderer or spec.parser or spec.draft_files:
            raise BadRequestError(f"{spec.name.display} is a speech model: QUANTIZE, RENDERER, PARSER and DRAFT "
                                  "apply to text models only")
        info = None
    else:
        if spec.quantize:
            layers = _quantized(store, layers, spec.quantize, emit, quantize)
        info = gguf.read_gguf(store.layer_path(models[0]))
        template = _inherited_template(store, layers) if spec.template is None else spec.template
        for kind in ("renderer", "parser"):
            value = getattr(spec, kind) or config.get(kind, "")
            if value:
                config[kind] = _check_honoured(kind, value, info, template or "", spec.name.display,
                                               inherited=not getattr(spec, kind))
    layers = _settings_layers(store, spec, layers)
    emit({"status": "writing manifest"})
    store.write_manifest(spec.name, Manifest(_config_layer(store, layers, info, config, spec.requires), tuple(layers)))
    emit({"status": "success"})


def _base_layers(store: Store, spec: CreateSpec, emit: Progress, config: dict[str, Any], pull: Pull) -> list[Layer]:
    """The layers ``FROM`` gives: a server file's, or a base model's (pulled first when missing)."""
    if spec.source_file is not None:
        kinds.validate(spec.source_file)
        if spec.in_place:
            emit({"status": "using file in place"})
            return [store.reference_file(spec.source_file)]
        emit({"status": "copying file"})
        digest = store.add_blob_from_file(spec.source_file, sharing="clone")
        return [Layer(MEDIA_TYPES["model"], digest, spec.source_file.stat().st_size)]
    if not spec.base:
        return []
    name = locate(spec.base).name
    if not store.has_model(name):
        # As Ollama does: a base the store lacks is pulled, its progress part of the create's.
        try:
            name = pull(spec.base, emit)
        except NotFoundError as error:
            raise NotFoundError(f'model "{spec.base}" not found locally, nor to pull: {error.message}',
                                param="from") from None
    indexed = store.lookup(name)
    if indexed is None:
        raise NotFoundError(f'model "{spec.base}" not found, try pulling it first', param="from")
    config.update(_base_config(store, indexed.manifest.config))
    parent = indexed.name.display
    # A file referenced in place keeps its path; every other layer records the base as its parent.
    return [layer if layer.from_path and os.path.isabs(layer.from_path) else replace(layer, from_path=parent)
            for layer in indexed.manifest.layers]


def _base_config(store: Store, config: Layer) -> dict[str, Any]:
    """What a model inherits from its base's config: its renderer and parser (REQUIRES is the new model's own)."""
    try:
        data = json.loads(store.layer_path(config).read_bytes())
    except (OSError, ValueError, MullamaError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: data[key] for key in ("renderer", "parser") if isinstance(data.get(key), str)}


def _uploaded(store: Store, digest: str, what: str, kind: str, param: str) -> Layer:
    """A layer for an uploaded blob of ``kind``; refused (naming the request's ``param``) when it was not uploaded."""
    digest = canonical_digest(digest)
    if not store.has_blob(digest):
        raise BadRequestError(f"blob {digest} for {what} was not uploaded", param=param)
    return Layer(MEDIA_TYPES[kind], digest, store.blob_path(digest).stat().st_size)


def _blob_layers(store: Store, files: dict[str, str], emit: Progress) -> list[Layer]:
    """The model files uploaded as blobs; a projector is known by its architecture, as Ollama knows it."""
    layers = []
    for filename, digest in files.items():
        layer = _uploaded(store, digest, filename, "model", "files")
        emit({"status": f"using existing layer {layer.digest}"})
        blob = store.blob_path(layer.digest)
        if kinds.validate(blob) == kinds.GGUF and gguf.read_gguf(blob).architecture == "clip":
            layer = replace(layer, media_type=MEDIA_TYPES["projector"])
        layers.append(layer)
    return layers


def _draft_layers(store: Store, files: dict[str, str], emit: Progress, config: dict[str, Any]) -> list[Layer]:
    """The DRAFT model's files as Ollama's draft layers, described in the config as Ollama describes them."""
    layers = []
    for filename, digest in files.items():
        layer = _uploaded(store, digest, f"draft {filename}", "draft", "draft_files")
        info = gguf.read_gguf(store.blob_path(layer.digest))
        if info.architecture == "clip":
            raise BadRequestError(f"DRAFT {filename} is a vision projector, not a model", param="draft_files")
        emit({"status": f"using existing layer {layer.digest}"})
        config["draft"] = {"model_format": "gguf", "architecture": info.architecture or ""}
        layers.append(layer)
    return layers


def _quantized(store: Store, layers: list[Layer], level: str, emit: Progress, quantize: Quantize) -> list[Layer]:
    """The layers with the (single-file) model re-quantized into a new blob."""
    models = [layer for layer in layers if layer.media_type == MEDIA_TYPES["model"]]
    if len(models) != 1:
        raise BadRequestError("quantize works on single-file models only", param="quantize")
    source = store.layer_path(models[0])
    emit({"status": f"quantizing {gguf.read_gguf(source).quantization} model to {level.upper()}"})
    store.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store.root, prefix=".quantize-", suffix=".gguf")
    os.close(fd)
    try:
        quantize(source, Path(tmp), level)
        digest = store.add_blob_from_file(tmp)
        size = Path(tmp).stat().st_size
    finally:
        os.unlink(tmp)
    return [Layer(MEDIA_TYPES["model"], digest, size) if layer is models[0] else layer for layer in layers]


def _inherited_template(store: Store, layers: list[Layer]) -> str | None:
    for layer in layers:
        if layer.media_type == MEDIA_TYPES["template"]:
            return store.layer_path(layer).read_text()
    return None


def _check_honoured(kind: str, value: str, info: gguf.GGUFInfo, template: str, name: str, *,
                    inherited: bool) -> str:
    """``value`` when Mullama does what the RENDERER or PARSER ``value`` names for this model, else refused.

    Mullama renders prompts with the model's template (TEMPLATE, else the
    GGUF's chat template) and reads tool calls and thinking by the format
    that template shows; of Ollama's built-in parsers it has gpt-oss's
    harmony, used for the models that speak it, and of its renderers none.
    An inherited value Mullama does not use is left out, as the base itself
    runs without it.
    """
    wanted = _HONOURED[kind].get(value)
    used = detect_format(template + (info.chat_template or ""), name, info.architecture or "").name
    if wanted is not None and wanted == used:
        return value
    if inherited:
        return ""
    if wanted is not None:
        raise BadRequestError(f'{kind.upper()} "{value}" is for models that speak the harmony format (gpt-oss); '
                              f"this model's template does not", param=kind)
    known = ", ".join(f'"{name}"' for name in _HONOURED[kind]) or "none"
    raise BadRequestError(f'{kind.upper()} "{value}" is not supported: of Ollama\'s built-in {kind}s Mullama has '
                          f"{known}; it renders prompts with the model's template (TEMPLATE, else the GGUF's chat "
                          f"template) and reads tool calls and thinking by that template's format. Remove the "
                          f"{kind.upper()} line, and give a TEMPLATE if the prompt format must change", param=kind)


def _settings_layers(store: Store, spec: CreateSpec, layers: list[Layer]) -> list[Layer]:
    """``layers`` with the request's TEMPLATE, SYSTEM, PARAMETER, MESSAGE and LICENSE layers replacing the base's."""

    def replaced(kind: str, data: bytes) -> None:
        nonlocal layers
        layers = [layer for layer in layers if layer.media_type != MEDIA_TYPES[kind]]
        layers.append(Layer(MEDIA_TYPES[kind], store.add_blob_bytes(data), len(data)))

    if spec.template is not None:
        replaced("template", spec.template.encode())
    if spec.system is not None:
        replaced("system", spec.system.encode())
    if spec.parameters:
        inherited: dict[str, Any] = {}
        for layer in layers:
            if layer.media_type == MEDIA_TYPES["params"]:
                inherited = json.loads(store.layer_path(layer).read_text())
        replaced("params", json.dumps({**inherited, **spec.parameters}).encode())
    if spec.messages:
        replaced("messages", json.dumps(spec.messages).encode())
    for text in spec.licenses:
        data = text.encode()
        layers.append(Layer(MEDIA_TYPES["license"], store.add_blob_bytes(data), len(data)))
    return layers


def _config_layer(store: Store, layers: list[Layer], info: gguf.GGUFInfo | None, extra: dict[str, Any],
                  requires: str) -> Layer:
    """Ollama's config blob: the model's format and family, and what the Modelfile set beyond layers.

    ``info`` is None for a whisper.cpp speech model (format ``ggml``).
    """
    family = info.architecture or "" if info is not None else "whisper"
    config: dict[str, Any] = {"model_format": "gguf" if info is not None else "ggml", "model_family": family,
                              "model_families": [family] if family else None,
                              "file_type": info.quantization if info is not None else ""}
    config.update({key: value for key, value in extra.items() if value})
    if requires:
        config["requires"] = requires.removeprefix("v")
    config.update({"architecture": "amd64", "os": "linux",
                   "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]}})
    data = json.dumps(config).encode()
    return Layer(CONFIG_MEDIA_TYPE, store.add_blob_bytes(data), len(data))
