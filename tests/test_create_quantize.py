"""``/api/create`` with ``quantize`` writes a re-quantized model, through the official client."""

from __future__ import annotations

import ollama
import pytest
from daemon import create_model, running


def test_create_with_quantize(tmp_path, model_path):
    with running(tmp_path) as server:
        create_model(server.server_address[1], model_path)
        client = ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}")
        statuses = [p.status for p in client.create(model="smol-q8", from_="smol", quantize="q8_0", stream=True)]
        assert any("quantizing Q4_1 model to Q8_0" in s for s in statuses) and statuses[-1] == "success"
        assert client.show("smol-q8").details.quantization_level == "Q8_0"
        reply = client.generate(model="smol-q8", prompt="Hi", options={"num_predict": 4, "num_thread": 1})
        assert reply.done
        with pytest.raises(ollama.ResponseError) as error:
            client.create(model="bad", from_="smol", quantize="q9_9")
        assert error.value.status_code == 400 and "unknown quantization" in error.value.error
