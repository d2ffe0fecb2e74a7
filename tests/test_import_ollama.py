"""Reusing models already on disk: Ollama's store (``list --ollama``, ``pull``) and GGUFs used in place."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import CLOSED_HUB, cli, serve

from mullama.store import modelfile
from mullama.cli import main
from mullama.cli.create import create_request
from mullama.errors import BadRequestError
from mullama.store.names import ModelName
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store


def _fake_ollama(root: Path, model_path: Path) -> Store:
    """An Ollama store: one complete model, one in a namespace, one whose model blob is missing."""
    ollama = Store(root)
    digest = ollama.add_blob_from_file(model_path, sharing="link")
    config = ollama.add_blob_bytes(b'{"model_format":"gguf"}')
    complete = Manifest(Layer(CONFIG_MEDIA_TYPE, config, 23),
                        (Layer(MEDIA_TYPES["model"], digest, model_path.stat().st_size),))
    ollama.write_manifest(ModelName.parse("smollm2:135m"), complete)
    ollama.write_manifest(ModelName.parse("hf.co/someone/tiny-gguf:Q4_1"), complete)
    missing = ModelName.parse("broken:latest").manifest_path(root)
    missing.parent.mkdir(parents=True)
    missing.write_bytes(Manifest(complete.config, (Layer(MEDIA_TYPES["model"], "sha256:" + "0" * 64, 9),)).to_bytes())
    return ollama


# list --ollama: read on the client's side, no daemon involved ------------


def test_list_ollama(tmp_path, monkeypatch, capsys, model_path):
    ollama = _fake_ollama(tmp_path / "ollama", model_path)
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama.root))
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:9")  # nothing answers there, and nothing is asked
    assert main(["list", "--ollama"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    entries = {entry.name.display: entry for entry in ollama.list_models()}
    assert [row.split()[0] for row in rows] == ["hf.co/someone/tiny-gguf:Q4_1", "smollm2:135m"]
    for row in rows:
        name, digest, size, unit, *modified = row.split()
        assert digest == entries[name].digest[:12]
        assert f"{size} {unit}" == "98 MB"
        assert " ".join(modified).endswith("ago")
    assert main(["ls", "--ollama", "SMOL"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["NAME", "smollm2:135m"]


def test_list_ollama_without_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nothing"))
    assert main(["list", "--ollama"]) == 1
    assert capsys.readouterr().err == ("Error: no Ollama model store found: set OLLAMA_MODELS to its directory "
                                       "(default ~/.ollama/models)\n")


# create --in-place: the request the CLI sends --------------------------------


def test_create_request_in_place(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    (tmp_path / "lora.gguf").write_bytes(b"GGUF lora")
    recipe = modelfile.parse("FROM ./weights.gguf\nADAPTER lora.gguf\nPARAMETER num_ctx 512\n")
    plan = create_request(recipe, tmp_path, in_place=True)
    assert plan.request["from"] == str((tmp_path / "weights.gguf").resolve())
    assert plan.request["in_place"] is True
    assert "files" not in plan.request
    # Only FROM is used in place: the adapter is still uploaded.
    assert list(plan.uploads.values()) == [(tmp_path / "lora.gguf").resolve()]
    assert plan.request["parameters"] == {"num_ctx": 512}


@pytest.mark.parametrize("source", ["llama3.2", "./missing.gguf", "."])
def test_create_in_place_needs_a_file(tmp_path, source):
    with pytest.raises(BadRequestError, match="--in-place needs FROM to name a GGUF file"):
        create_request(modelfile.parse(f"FROM {source}\n"), tmp_path, in_place=True)


# Against a live daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path) -> Iterator[dict[str, str]]:
    """A ``mullama serve`` that sees a fake Ollama store and no Hub; yields the CLI's environment."""
    tmp = tmp_path_factory.mktemp("import")
    _fake_ollama(tmp / "ollama", model_path)
    # --in-place names a file of this machine: the daemon reads it only under MULLAMA_ALLOWED_DIRS.
    serving = serve(tmp, OLLAMA_MODELS=str(tmp / "ollama"), HF_ENDPOINT=CLOSED_HUB, HF_HUB_OFFLINE="1",
                    MULLAMA_ALLOWED_DIRS=str(tmp_path_factory.getbasetemp()))
    yield serving.env
    serving.stop()


def _manifest(env: dict[str, str], name: str) -> dict:
    return json.loads(ModelName.parse(name).manifest_path(Path(env["MULLAMA_MODELS"])).read_bytes())


def test_pull_imports_from_ollama(daemon):
    result = cli(daemon, "pull", "smollm2:135m")
    assert result.returncode == 0, result.stderr
    assert result.stderr.rstrip().endswith("success")
    listed = cli(daemon, "list").stdout
    assert any(line.startswith("smollm2:135m ") for line in listed.splitlines())
    (layer,) = _manifest(daemon, "smollm2:135m")["layers"]
    blob = Store(daemon["MULLAMA_MODELS"]).blob_path(layer["digest"])
    ollama_blob = Store(daemon["OLLAMA_MODELS"]).blob_path(layer["digest"])
    assert os.stat(blob).st_ino == os.stat(ollama_blob).st_ino  # linked, not downloaded nor copied
    assert "from" not in layer
    shown = cli(daemon, "show", "smollm2:135m")
    assert shown.returncode == 0 and "architecture" in shown.stdout, shown.stderr
    missing = cli(daemon, "pull", "broken")
    assert missing.returncode == 1
    assert missing.stderr.rstrip().splitlines()[-1].startswith('Error: model "broken:latest" is not in')


def test_create_in_place(daemon, model_path, tmp_path):
    weights = tmp_path / "weights" / "smol.gguf"
    weights.parent.mkdir()
    shutil.copyfile(model_path, weights)
    with weights.open("ab") as padded:
        padded.write(b"\0" * 32)  # bytes of its own: no other model of this store shares its digest
    recipe = tmp_path / "Modelfile"
    recipe.write_text("FROM ./weights/smol.gguf\nPARAMETER num_predict 4\nPARAMETER temperature 0\n"
                      "PARAMETER num_ctx 512\n")
    result = cli(daemon, "create", "inplace", "-f", str(recipe), "--in-place")
    assert result.returncode == 0, result.stderr
    assert "copying file" not in result.stderr and result.stderr.rstrip().endswith("success")
    (layer, *_) = _manifest(daemon, "inplace")["layers"]
    assert layer["from"] == str(weights.resolve()) and layer["size"] == weights.stat().st_size
    assert not Store(daemon["MULLAMA_MODELS"]).has_blob(layer["digest"])
    answer = cli(daemon, "run", "inplace", "Say hi")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    with weights.open("ab") as grown:
        grown.write(b"\0")
    changed = cli(daemon, "run", "inplace", "Say hi")
    assert changed.returncode == 1 and "changed size" in changed.stderr
    assert cli(daemon, "rm", "inplace").returncode == 0
    assert weights.exists()
    by_name = tmp_path / "ByName"
    by_name.write_text("FROM smollm2:135m\n")
    wrong = cli(daemon, "create", "other", "-f", str(by_name), "--in-place")
    assert wrong.returncode == 1
    assert wrong.stderr.endswith("Error: --in-place needs FROM to name a GGUF file: smollm2:135m\n")
