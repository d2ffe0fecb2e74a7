"""Create, show and the model list as Ollama has them, on a real daemon through the official ``ollama`` client.

The daemon's Hugging Face is a local Hub (tests/hub_server.py), so a
``FROM`` naming a model the store lacks is pulled for real. The ollama
client has no field for ``requires``, ``renderer``, ``parser``,
``draft_files`` or ``verbose``: those requests go by hand, as its raw
answer carries fields its types drop (``tensors``, ``requires``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ollama
import pytest
from daemon import cli, create_model, environment, exchange, running
from hub_server import HubServer
from projector import tiny_projector_path

from mullama.http.server import Server
from mullama.store.blobs import MEDIA_TYPES
from mullama.store.names import ModelName

REPO = "someone/SmolLM2-135M-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = "smol"
THREADS = {"num_thread": 1}


@dataclass
class Daemon:
    """A running daemon whose Hugging Face is ``hub``, and the official client on it."""

    server: Server
    client: ollama.Client
    hub: HubServer
    tmp: Path

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A JSON request by hand: its status and decoded body."""
        status, data = exchange(self.server, "POST", path, body)
        return status, json.loads(data) if data else {}

    def show(self, name: str, **fields: Any) -> dict[str, Any]:
        status, body = self.post("/api/show", {"model": name, **fields})
        assert status == 200, body
        return body

    def create(self, **body: Any) -> tuple[int, dict[str, Any]]:
        return self.post("/api/create", {"stream": False, **body})

    def manifest_layers(self, name: str) -> list[str]:
        store = self.server.app.manager.store
        return [layer.media_type for layer in store.read_manifest(ModelName.parse(name)).layers]

    def config(self, name: str) -> dict[str, Any]:
        store = self.server.app.manager.store
        return json.loads(store.blob_path(store.read_manifest(ModelName.parse(name)).config.digest).read_bytes())


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("create-show")
    with HubServer() as hub, running(tmp, HF_ENDPOINT=hub.endpoint, MULLAMA_ALIASES=str(tmp / "no-aliases.json")) \
            as server:
        create_model(server.server_address[1], model_path, BASE, parameters=THREADS)
        with ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120) as client:
            yield Daemon(server, client, hub, tmp)


def tags_entry(daemon: Daemon, name: str) -> dict[str, Any]:
    status, data = exchange(daemon.server, "GET", "/api/tags")
    assert status == 200
    return next(entry for entry in json.loads(data)["models"] if entry["name"] == name)


# --- FROM pulls the base -------------------------------------------------------


def test_from_a_model_the_store_lacks_pulls_it_with_progress(daemon: Daemon, model_path: Path, tmp_path: Path) -> None:
    # Bytes the store does not hold yet (a GGUF may end with padding), so the pull downloads them.
    hub_copy = tmp_path / FILE
    hub_copy.write_bytes(model_path.read_bytes() + bytes(32))
    daemon.hub.add(REPO, FILE, hub_copy)
    base = f"hf.co/{REPO}:q4_1"
    assert base not in [m.model for m in daemon.client.list().models]
    events = list(daemon.client.create(model="pulled-child", from_=base, system="Be brief.", stream=True))
    statuses = [event.status for event in events]
    assert statuses[0] == "pulling manifest"
    downloads = [event for event in events if event.digest]
    assert downloads and downloads[-1].completed == downloads[-1].total == hub_copy.stat().st_size
    assert statuses[-2:] == ["writing manifest", "success"]
    assert len(daemon.hub.state.gets(FILE)) == 1
    assert base in [m.model for m in daemon.client.list().models]
    shown = daemon.show("pulled-child")
    assert shown["details"]["parent_model"] == base and shown["system"] == "Be brief."
    reply = daemon.client.generate(model="pulled-child", prompt="Hi", options={"num_predict": 2, **THREADS})
    assert reply.done and reply.eval_count > 0


def test_mullama_create_pulls_the_base_of_a_modelfile(daemon: Daemon, model_path: Path, tmp_path: Path) -> None:
    daemon.hub.add(REPO, "SmolLM2-135M-Instruct.Q8_0.gguf", model_path)
    (tmp_path / "Modelfile").write_text(f"FROM hf.co/{REPO}:q8_0\nPARAMETER num_predict 3\n")
    done = cli(environment(tmp_path, daemon.port), "create", "cli-pulled", "-f", str(tmp_path / "Modelfile"))
    assert done.returncode == 0, done.stderr
    assert "pulling manifest" in done.stderr and "success" in done.stderr
    assert daemon.show("cli-pulled")["details"]["parent_model"] == f"hf.co/{REPO}:q8_0"


def test_from_a_name_known_nowhere_says_so(daemon: Daemon) -> None:
    status, body = daemon.create(model="orphan", **{"from": "no-such-model:7b"})
    assert status == 404
    assert 'model "no-such-model:7b" not found locally, nor to pull' in body["error"]
    assert "hf:" in body["error"]  # the pull's advice on naming a Hub repository comes along


# --- parent model ------------------------------------------------------------------


def test_parent_model_in_show_and_tags(daemon: Daemon) -> None:
    daemon.client.create(model="child", from_=BASE, system="x")
    daemon.client.create(model="grandchild", from_="child", parameters={"top_k": 3})
    assert daemon.client.show("child").details.parent_model == "smol:latest"
    assert daemon.client.show("grandchild").details.parent_model == "child:latest"
    assert daemon.client.show(BASE).details.parent_model == ""
    listed = {m.model: m.details.parent_model for m in daemon.client.list().models}
    assert listed["child:latest"] == "smol:latest" and listed["smol:latest"] == ""


# --- REQUIRES ----------------------------------------------------------------------


def test_requires_is_kept_and_shown(daemon: Daemon) -> None:
    assert daemon.create(model="needs-old", requires="v0.5.1", **{"from": BASE})[0] == 200
    assert daemon.show("needs-old")["requires"] == "0.5.1"
    assert daemon.config("needs-old")["requires"] == "0.5.1"
    assert "requires" not in daemon.show(BASE)


@pytest.mark.parametrize("requires", ["99.0.0", "0.99", "1.0.0-rc1"])
def test_requires_a_newer_ollama_is_refused(daemon: Daemon, requires: str) -> None:
    status, body = daemon.create(model="needs-new", requires=requires, **{"from": BASE})
    assert status == 400
    assert f"requires Ollama {requires} or later" in body["error"] and "0.13.0" in body["error"]
    assert "needs-new:latest" not in [m.model for m in daemon.client.list().models]


def test_requires_that_is_no_version_is_refused(daemon: Daemon) -> None:
    status, body = daemon.create(model="needs-what", requires="banana", **{"from": BASE})
    assert status == 400 and "semver" in body["error"]


def test_mullama_create_refuses_a_modelfile_requiring_a_newer_ollama(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text(f"FROM {BASE}\nREQUIRES 42.0.0\n")
    done = cli(environment(tmp_path, daemon.port), "create", "cli-new", "-f", str(tmp_path / "Modelfile"))
    assert done.returncode != 0 and "requires Ollama 42.0.0 or later" in done.stderr


# --- DRAFT -------------------------------------------------------------------------


def test_draft_is_stored_as_ollamas_draft_layer(daemon: Daemon, model_path: Path) -> None:
    digest = daemon.client.create_blob(model_path)
    assert daemon.create(model="drafted", draft_files={"draft.gguf": digest}, **{"from": BASE})[0] == 200
    assert daemon.manifest_layers("drafted").count(MEDIA_TYPES["draft"]) == 1
    assert MEDIA_TYPES["draft"] == "application/vnd.ollama.image.draft"
    assert daemon.config("drafted")["draft"] == {"model_format": "gguf", "architecture": "llama"}
    shown = daemon.show("drafted")
    assert "\nDRAFT " in shown["modelfile"]
    # A model made from it keeps the draft, as in Ollama.
    daemon.client.create(model="drafted-child", from_="drafted", system="y")
    assert MEDIA_TYPES["draft"] in daemon.manifest_layers("drafted-child")


def test_draft_that_is_a_projector_is_refused(daemon: Daemon) -> None:
    digest = daemon.client.create_blob(tiny_projector_path())
    status, body = daemon.create(model="bad-draft", draft_files={"mmproj.gguf": digest}, **{"from": BASE})
    assert status == 400 and "projector" in body["error"]


def test_mullama_create_sends_the_draft_of_a_modelfile(daemon: Daemon, model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "draft.gguf").symlink_to(model_path)
    (tmp_path / "Modelfile").write_text(f"FROM {BASE}\nDRAFT ./draft.gguf\n")
    done = cli(environment(tmp_path, daemon.port), "create", "cli-drafted", "-f", str(tmp_path / "Modelfile"))
    assert done.returncode == 0, done.stderr
    assert MEDIA_TYPES["draft"] in daemon.manifest_layers("cli-drafted")


# --- RENDERER and PARSER -----------------------------------------------------------

HARMONY_TEMPLATE = ("{{ range .Messages }}<|start|>{{ .Role }}<|channel|>final<|message|>{{ .Content }}<|end|>"
                    "{{ end }}<|start|>assistant")


@pytest.mark.parametrize("kind", ["renderer", "parser"])
def test_a_renderer_or_parser_mullama_lacks_is_refused(daemon: Daemon, kind: str) -> None:
    status, body = daemon.create(model="coder", **{kind: "qwen3-coder", "from": BASE})
    assert status == 400
    assert f'{kind.upper()} "qwen3-coder" is not supported' in body["error"] and "TEMPLATE" in body["error"]
    assert "coder:latest" not in [m.model for m in daemon.client.list().models]


def test_the_harmony_parser_is_honoured_only_for_a_harmony_model(daemon: Daemon) -> None:
    status, body = daemon.create(model="harmonious", parser="harmony", **{"from": BASE})
    assert status == 400 and "harmony format" in body["error"]
    # Ollama has a harmony parser but no harmony renderer.
    status, body = daemon.create(model="harmonious", template=HARMONY_TEMPLATE, renderer="harmony", **{"from": BASE})
    assert status == 400 and 'RENDERER "harmony" is not supported' in body["error"]
    status, body = daemon.create(model="harmonious", template=HARMONY_TEMPLATE, parser="harmony", **{"from": BASE})
    assert status == 200, body
    shown = daemon.show("harmonious")
    assert "\nPARSER harmony\n" in shown["modelfile"]
    assert shown["capabilities"] == ["completion", "tools", "thinking"]
    assert daemon.config("harmonious")["parser"] == "harmony"


# --- show: tensors, model_info --------------------------------------------------------


def test_show_lists_every_tensor(daemon: Daemon) -> None:
    for verbose in (False, True):
        tensors = {t["name"]: t for t in daemon.show(BASE, verbose=verbose)["tensors"]}
        # SmolLM2-135M: 30 blocks of 9 tensors, the embeddings and the final norm; width 576, 3 KV heads of 64.
        assert len(tensors) == 30 * 9 + 2
        assert tensors["token_embd.weight"]["shape"] == [576, 49152]
        assert tensors["blk.0.attn_k.weight"]["shape"] == [576, 192]
        assert tensors["blk.29.ffn_down.weight"] == {"name": "blk.29.ffn_down.weight", "type": "Q4_1",
                                                     "shape": [1536, 576]}
        assert tensors["output_norm.weight"]["type"] == "F32"


def test_show_verbose_gives_every_array_whole(daemon: Daemon) -> None:
    brief = daemon.show(BASE)["model_info"]
    assert brief["tokenizer.ggml.tokens"] is None and brief["general.parameter_count"] == 134515008
    full = daemon.show(BASE, verbose=True)["model_info"]
    assert len(full["tokenizer.ggml.tokens"]) == full["llama.vocab_size"] == 49152
    assert "<|im_start|>" in full["tokenizer.ggml.tokens"]
    assert "general.name" not in full and "tokenizer.chat_template" not in full


# --- capabilities ----------------------------------------------------------------------

THINKING_TEMPLATE = ("{{ range .Messages }}<|{{ .Role }}|>{{ if .Thinking }}<|thinking|>{{ .Thinking }}<|/thinking|>"
                     "{{ end }}{{ .Content }}{{ end }}")
CODE_TEMPLATE = ("{{ if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ if .Tools }}{{ .Tools }}"
                 "{{ end }}{{ .Prompt }}{{ end }}")
#: Mentions <think> and "fim" as mere text: neither makes a capability.
PLAIN_TEMPLATE = "{{ .System }} <think> fim {{ .Prompt }}"


@pytest.mark.parametrize(("name", "template", "expected"), [
    ("caps-think", THINKING_TEMPLATE, ["completion", "thinking"]),
    ("caps-code", CODE_TEMPLATE, ["completion", "tools", "insert"]),
    ("caps-plain", PLAIN_TEMPLATE, ["completion"]),
])
def test_capabilities_follow_ollamas_rules(daemon: Daemon, name: str, template: str, expected: list[str]) -> None:
    daemon.client.create(model=name, from_=BASE, template=template)
    assert daemon.client.show(name).capabilities == expected
    assert tags_entry(daemon, f"{name}:latest")["capabilities"] == expected


def test_tags_carry_what_ollamas_carry(daemon: Daemon) -> None:
    entry = tags_entry(daemon, "smol:latest")
    assert entry["capabilities"] == ["completion"]
    assert entry["details"]["context_length"] == 8192 and entry["details"]["embedding_length"] == 576
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details", "capabilities"}
    assert set(entry["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                     "quantization_level", "context_length", "embedding_length"}


def test_vision_in_tags_only_with_a_projector_that_loads(daemon: Daemon, model_path: Path) -> None:
    model = daemon.client.create_blob(model_path)
    projector = daemon.client.create_blob(tiny_projector_path())
    daemon.client.create(model="seeing", files={"model.gguf": model, "mmproj.gguf": projector})
    assert tags_entry(daemon, "seeing:latest")["capabilities"] == ["completion", "vision"]
    assert daemon.client.show("seeing").capabilities == ["completion", "vision"]


def test_a_vision_models_modelfile_from_show_creates_it_again(daemon: Daemon, model_path: Path,
                                                              tmp_path: Path) -> None:
    model = daemon.client.create_blob(model_path)
    projector = daemon.client.create_blob(tiny_projector_path())
    daemon.client.create(model="seen", files={"model.gguf": model, "mmproj.gguf": projector}, system="Look.")
    env = environment(tmp_path, daemon.port)
    shown = cli(env, "show", "seen", "--modelfile")
    assert shown.returncode == 0, shown.stderr
    # As Ollama prints it: the projector is a second FROM line.
    assert [line for line in shown.stdout.splitlines() if line.startswith("FROM ")] == [
        f"FROM {daemon.server.app.manager.store.blob_path(model)}",
        f"FROM {daemon.server.app.manager.store.blob_path(projector)}"]
    (tmp_path / "Modelfile").write_text(shown.stdout)
    done = cli(env, "create", "seen-again", "-f", str(tmp_path / "Modelfile"))
    assert done.returncode == 0, done.stderr
    again = daemon.show("seen-again")
    assert again["capabilities"] == ["completion", "vision"] and again["system"] == "Look."
    assert again["projector_info"]["general.architecture"] == "clip"


# --- routes ---------------------------------------------------------------------------


def test_head_tags_answers_like_get(daemon: Daemon) -> None:
    status, data = exchange(daemon.server, "GET", "/api/tags")
    assert status == 200 and json.loads(data)["models"]
    status, data = exchange(daemon.server, "HEAD", "/api/tags")
    assert (status, data) == (200, b"")


#: Ollama's route table (server/routes.go, GenerateRoutes) for what a local daemon answers, and how Mullama
#: answers each: the status, and a piece of the body.
OLLAMA_ROUTES = [
    ("GET", "/", None, 200, "Ollama is running"),
    ("HEAD", "/", None, 200, ""),
    ("GET", "/api/version", None, 200, '"version"'),
    ("HEAD", "/api/version", None, 200, ""),
    ("GET", "/api/status", None, 200, '"cloud": {"disabled": true'),
    ("POST", "/api/pull", {"model": "no-such-model:1b", "stream": False}, 404, "no-such-model"),
    ("POST", "/api/push", {"model": "smol"}, 400, "push is not supported"),
    ("GET", "/api/tags", None, 200, '"models"'),
    ("HEAD", "/api/tags", None, 200, ""),
    ("POST", "/api/show", {"model": "smol"}, 200, '"capabilities"'),
    ("DELETE", "/api/delete", {"model": "no-such-model"}, 404, "not found"),
    ("POST", "/api/me", {}, 401, "unauthorized"),
    ("POST", "/api/signout", {}, 401, "you are not currently signed in"),
    ("DELETE", "/api/user/keys/abc", None, 401, "you are not currently signed in"),
    ("POST", "/api/create", {"model": "x", "stream": False}, 400, "neither 'from' nor 'files'"),
    ("HEAD", "/api/blobs/sha256:" + "0" * 64, None, 404, ""),
    ("POST", "/api/copy", {"source": "no-such-model", "destination": "y"}, 404, "not found"),
    ("POST", "/api/experimental/web_search", {"query": "x"}, 403, "ollama cloud is disabled: web search"),
    ("POST", "/api/experimental/web_fetch", {"url": "x"}, 403, "ollama cloud is disabled: web fetch"),
    ("GET", "/api/experimental/model-recommendations", None, 200, '"recommendations": []'),
    ("GET", "/api/ps", None, 200, '"models"'),
    ("POST", "/api/generate", {"model": "no-such-model"}, 404, "not found"),
    ("POST", "/api/chat", {"model": "no-such-model"}, 404, "not found"),
    ("POST", "/api/embed", {"model": "no-such-model"}, 404, "not found"),
    ("POST", "/api/embeddings", {"model": "no-such-model", "prompt": "x"}, 404, "not found"),
    ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
    ("POST", "/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "not found"),
    ("POST", "/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404, "not found"),
    ("GET", "/v1/models", None, 200, '"object": "list"'),
    ("GET", "/v1/models/smol", None, 200, '"id": "smol'),
    ("POST", "/v1/responses", {"model": "no-such-model", "input": "x"}, 404, "not found"),
    ("POST", "/v1/messages", {"model": "no-such-model", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
     404, "not found"),
]


def test_every_route_of_ollamas_table_is_answered(daemon: Daemon) -> None:
    wrong = []
    for method, path, body, status, piece in OLLAMA_ROUTES:
        got, data = exchange(daemon.server, method, path, body)
        if got != status or piece not in data.decode():
            wrong.append(f"{method} {path}: {got} {data[:200]!r}")
    assert wrong == []
