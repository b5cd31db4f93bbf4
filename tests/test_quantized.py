"""4-bit and 8-bit loading through bitsandbytes, on the CPU, with the same service code."""

from __future__ import annotations

import pytest

from model.loading import CheckpointSettings
from model.local import LocalBackend
from model.service import Chat, GenerationParams, GenerationRequest, Message
from tests.conftest import BOTH_FAMILIES


@BOTH_FAMILIES
@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
async def test_quantized_checkpoint_generates_on_cpu(tiny_checkpoint, quantization, layer):
    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint), dtype="float32", quantization=quantization))
    try:
        model = service._model.model
        layers = model.layers if hasattr(model, "layers") else model.text_model.layers  # IDEFICS v1, Idefics3
        assert type(layers[0].mlp.down_proj).__name__ == layer
        finished = await service.generate(
            GenerationRequest(Chat((Message("user", ("What is this?",)),)), GenerationParams(max_new_tokens=6))
        )
    finally:
        await service.close()
    assert finished.tokens > 0
