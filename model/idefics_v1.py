"""IDEFICS v1 (`IdeficsForVisionText2Text`) as a model family: the instruct format, and images as
perceiver states that every decoding step attends to through the gated cross-attention layers."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from ground.images import ModelImage
from model.batch import Row
from model.family import Family, ProcessedPrompt, floating_weights
from model.image_cache import ImageCache
from model.instruct import render_instruct
from model.markers import marked_text
from model.pictures import decode
from model.service import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Chat, Part


def processor_items(prompt: Sequence[Part]) -> list:
    """Prompt items as IDEFICS' processor takes them: PIL images, and text it can't mistake for a URL.

    The processor downloads any text item that parses as a URL. Such an item (a user typing only
    a link) is handed over one character at a time: the processor concatenates text items with
    no separator, so the tokens are the same, and no single character is a URL.
    """
    from transformers.models.idefics.processing_idefics import is_url

    items: list = []
    for item in prompt:
        if not isinstance(item, str):
            items.append(decode(cast("ModelImage", item)))
        elif is_url(item.strip(" ")):
            items.extend(item)
        else:
            items.append(item)
    return items


@dataclass(frozen=True)
class PerceiverImages:
    """Each row's images (perceiver states, zero-padded to the batch's most images) and the image
    mask its decoded tokens use: that of its last prompt token, as `generate` does."""

    states: torch.Tensor  # (rows, images, states, hidden)
    mask: torch.Tensor  # (rows, images) bool

    def step_inputs(self, model, width: int = 1) -> dict[str, Any]:
        return _image_arguments(model, self.states, self.mask[:, None].expand(-1, width, -1))

    def select(self, index: torch.Tensor, rows: Sequence[Row]) -> PerceiverImages:
        slots = max([1, *(row.images for row in rows)])  # image slots only the rows that left needed go
        return PerceiverImages(self.states[index, :slots], self.mask[index, :slots])

    def concatenate(self, others: Sequence[Any]) -> PerceiverImages:
        parts = [self, *others]
        slots = max(part.states.shape[1] for part in parts)

        def slotted(tensor: torch.Tensor) -> torch.Tensor:
            return F.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, slots - tensor.shape[1]])

        return PerceiverImages(torch.cat([slotted(part.states) for part in parts]), torch.cat([slotted(part.mask) for part in parts]))


class PerceiverVision(torch.nn.Module):
    """IDEFICS v1's pixels to the states its cross-attention reads: the vision encoder, then the
    perceiver's latents (if the config uses the perceiver)."""

    def __init__(self, vision_model: torch.nn.Module, perceiver: torch.nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.perceiver = perceiver

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return states if self.perceiver is None else self.perceiver(states)


def image_state_shape(config) -> tuple[int, int]:
    """(states, hidden) of one image as the language model sees it: perceiver latents, or patches."""
    vision = config.vision_config
    if config.use_resampler:
        return config.perceiver_config.resampler_n_latents, vision.embed_dim
    return (vision.image_size // vision.patch_size) ** 2 + 1, vision.embed_dim


def image_attention_mask(ids: torch.Tensor, image_id: int, end_id: int, images: int) -> torch.Tensor:
    """Which image each token sees, (tokens, images) bool: the last <image> at or before it, none
    before the first image or after an end of document (until the next image). The rule of IDEFICS'
    processor (`image_attention_mask_for_packed_input_ids`), whose Python loop over every token
    costs milliseconds per prompt; here it is a few tensor operations."""
    positions = torch.arange(len(ids))
    is_image = ids == image_id
    seen = is_image.cumsum(0) - 1  # the index of the last image so far
    last_image = torch.where(is_image, positions, -1).cummax(0).values
    last_end = torch.where(ids == end_id, positions, -1).cummax(0).values
    last_end_before = torch.cat([torch.tensor([-1]), last_end[:-1]])  # an end token still sees its image
    seen = torch.where(last_end_before > last_image, -1, seen)
    return seen[:, None] == torch.arange(images)


def _image_arguments(model, states: torch.Tensor, token_images: torch.Tensor) -> dict[str, Any]:
    key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
    return {key: states.flatten(0, 1), "image_attention_mask": token_images}


class IdeficsV1(Family):
    """IDEFICS v1: HuggingFaceM4/idefics-9b-instruct, idefics-80b-instruct."""

    name = "idefics"
    model_class = "IdeficsForVisionText2Text"
    banned_tokens = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN)

    def __init__(self, processor, config, image_cache: ImageCache | None = None):
        super().__init__(processor, config, image_cache)
        self._image_shape = image_state_shape(config)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def render(self, chat: Chat) -> list[Part]:
        return render_instruct(chat)

    def processed_text(self, chat: Chat) -> str:
        # The same text the processor builds: <s>, then the shared marker rules (model/markers.py).
        return self.tokenizer.bos_token + marked_text(self.render(chat))

    def model_inputs(self, chats: Sequence[Chat]) -> Any:
        prompts = [processor_items(self.render(chat)) for chat in chats]
        return self.processor(text=prompts, padding=True, return_tensors="pt", add_end_of_utterance_token=False)

    def process(self, chat: Chat, cached: Container[str]) -> ProcessedPrompt:
        # The processor's tokens and pixels, without its per-token Python loop for the image mask,
        # and pixels only for the images not encoded yet.
        ids = self.token_ids([chat])[0]
        images = tuple(part for part in self.render(chat) if isinstance(part, ModelImage))
        if not images:
            return ProcessedPrompt(ids, torch.zeros((len(ids), 0), dtype=torch.bool), (), (), {})
        mask = image_attention_mask(torch.tensor(ids), self.image_token_id, self.tokenizer.eos_token_id, len(images))
        new = self.new_images(images, cached)
        pixels = {"pixel_values": self.processor.image_processor([decode(image) for image in new], return_tensors="pt")} if new else {}
        return ProcessedPrompt(ids, mask, tuple(image.digest for image in images), tuple(image.digest for image in new), pixels)

    def vision(self, model) -> PerceiverVision:
        inner = model.model
        return PerceiverVision(inner.vision_model, inner.perceiver_resampler if model.config.use_resampler else None)

    def encode_images(self, vision: torch.nn.Module, processed: ProcessedPrompt) -> list[torch.Tensor]:
        # (1, states, hidden) per image, each its own copy, so that what the image cache keeps of
        # one image is that image's bytes alone.
        weights = floating_weights(vision)
        states = vision(processed.pixels["pixel_values"].to(weights.device, weights.dtype))
        return [image.clone() for image in states.split(1)]

    def prefill_inputs(self, model, rows: Sequence[Row], ids: torch.Tensor) -> tuple[dict[str, Any], PerceiverImages]:
        longest = ids.shape[1]
        slots = max([1, *(row.images for row in rows)])
        token_images = torch.zeros((len(rows), longest, slots), dtype=torch.bool, device=ids.device)
        states = torch.zeros((len(rows), slots, *self._image_shape), dtype=model.dtype, device=ids.device)
        for index, row in enumerate(rows):
            if row.prompt.images is not None:
                token_images[index, longest - len(row.ids) :, : row.images] = row.image_mask()
                states[index, : row.images] = row.prompt.images
        inputs = {"input_ids": ids, **_image_arguments(model, states, token_images)}
        return inputs, PerceiverImages(states, token_images[:, -1])

    def image_preparation(self) -> dict[str, int]:
        return {"image_size": self.processor.image_processor.size.height}
