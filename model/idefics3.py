"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`) as a model family.

Prompts come from the checkpoint's own chat template (`processor.apply_chat_template`). The
processor turns each image into tiles plus a downscaled global image (`do_image_splitting`), each
a run of <image> tokens; the vision encoder and connector turn the pixels into one embedding per
<image> token, once per request, and the prefill writes them into the prompt's embeddings. From
there on it is a causal language model: its images live in the KV cache, and a decoding step feeds
nothing but the row's last token.
"""

from __future__ import annotations

import io
import re
from collections.abc import Container, Sequence
from typing import Any

import torch
from PIL import Image

from ground.images import ModelImage
from model.batch import Prompt, Row
from model.family import Family, ProcessedPrompt, floating_weights, pictures
from model.image_cache import ImageCache
from model.pictures import decode
from model.service import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Chat, Message, Part

GLOBAL_IMAGE_TOKEN = "<global-img>"
_IMAGE_PLACE = re.compile(re.escape(IMAGE_TOKEN))


class TileVision(torch.nn.Module):
    """Idefics3's tiles to one embedding per <image> token: the vision encoder on each tile's patches
    that hold pixels, then the connector (pixel shuffle and projection). What the model's
    `get_image_features` does for one prompt's tiles, which are never padding images."""

    def __init__(self, vision_model: torch.nn.Module, connector: torch.nn.Module, patch_size: int):
        super().__init__()
        self.vision_model = vision_model
        self.connector = connector
        self.patch_size = patch_size

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        """(1, tiles, channels, height, width) pixels and their (1, tiles, height, width) mask of real
        pixels (not padding) to (tiles x image_seq_len, hidden) embeddings."""
        size = self.patch_size
        patches = pixel_attention_mask.flatten(0, 1).unfold(1, size, size).unfold(2, size, size)
        states = self.vision_model(pixel_values=pixel_values.flatten(0, 1), patch_attention_mask=patches.any(-1).any(-1)).last_hidden_state
        return self.connector(states).flatten(0, -2)


class CachedImages:
    """Idefics3 rows need nothing of their images after the prefill: the cache holds them."""

    def step_inputs(self, model, width: int = 1) -> dict[str, Any]:
        return {}

    def select(self, index: torch.Tensor, rows: Sequence[Row]) -> CachedImages:
        return self

    def concatenate(self, others: Sequence[Any]) -> CachedImages:
        return self


def _images(chat: Chat) -> list[Part]:
    """The images of the chat's messages, in order (a v1 guide prompt's are not this family's)."""
    return [part for message in chat.messages for part in message.parts if not isinstance(part, str)]


def _content(message: Message) -> list[dict]:
    """A message's parts as the chat template takes them: text parts (stripped, the speaker's name
    first) and image parts, in order. (The template drops a `content` that is a plain string.)"""
    content: list[dict] = []
    for part in message.parts:
        if not isinstance(part, str):
            content.append({"type": "image"})
        elif part.strip():
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += " " + part.strip()
            else:
                content.append({"type": "text", "text": part.strip()})
    if message.speaker:
        if content and content[0]["type"] == "text":
            content[0]["text"] = f"[{message.speaker}] {content[0]['text']}"
        else:
            content.insert(0, {"type": "text", "text": f"[{message.speaker}]"})
    return content


class Idefics3(Family):
    """Idefics3 and the SmolVLM image models built on it."""

    name = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"

    def __init__(self, processor, config, image_cache: ImageCache | None = None):
        super().__init__(processor, config, image_cache)
        tokenizer = self.tokenizer
        self.image_token_id = config.image_token_id
        # Besides the image tokens, the tile tokens and the global image's: generated, they would
        # only confuse the model; <image> itself would break the merge of the next prefill.
        vocab = tokenizer.get_vocab()
        tiles = [token for token in vocab if re.fullmatch(r"<row_\d+_col_\d+>", token)]
        self.banned_tokens = tuple(token for token in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *sorted(tiles)) if token in vocab)

    @property
    def context_tokens(self) -> int:
        return self.config.text_config.max_position_embeddings

    # -- prompts -------------------------------------------------------------------------------

    def text(self, chat: Chat) -> str:
        """The chat through the checkpoint's chat template, each image as one <image> (the
        processor expands it), then the start of the reply."""
        messages = [{"role": message.role, "content": _content(message)} for message in chat.messages]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template ends with "Assistant:"; the model's reply starts with a space.
        return f"{text} {chat.reply_start.lstrip(' ')}" if chat.reply_start else text

    def render(self, chat: Chat) -> list[Part]:
        images = iter(_images(chat))
        rendered: list[Part] = []
        for piece in _IMAGE_PLACE.split(self.text(chat)):
            if rendered:
                rendered.append(next(images))
            rendered.append(piece)
        return [part for part in rendered if part != ""]

    def processed_text(self, chat: Chat) -> str:
        pieces = _IMAGE_PLACE.split(self.text(chat))
        expanded = [pieces[0]]
        for image, piece in zip(_images(chat), pieces[1:]):
            expanded += [self.image_text(image), piece]
        return "".join(expanded)

    def image_text(self, image: object) -> str:
        """The tokens the processor writes for `image` (tiles and the global image): from its size
        when it is a `ModelImage`, else for the largest image the processor makes."""
        if isinstance(image, ModelImage):
            with Image.open(io.BytesIO(image.data)) as picture:
                width, height = picture.size
        else:
            height = width = self.longest_edge
        _, rows, columns = self.processor.image_processor.get_number_of_image_patches(height, width, {})
        return self.processor.replace_image_token({"rows": [[rows]], "cols": [[columns]]}, 0)

    @property
    def longest_edge(self) -> int:
        """The image processor's longest edge: larger images are scaled down to it, smaller ones up."""
        size = self.processor.image_processor.size
        return size["longest_edge"] if isinstance(size, dict) else size.longest_edge

    def model_inputs(self, chats: Sequence[Chat]) -> Any:
        texts = [self.text(chat) for chat in chats]
        images = [pictures(_images(chat)) for chat in chats]
        if not any(images):
            return self.processor(text=texts, padding=True, return_tensors="pt")
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    # -- the running batch ---------------------------------------------------------------------

    def process(self, chat: Chat, cached: Container[str]) -> ProcessedPrompt:
        # The tokens from the text alone (`processed_text` writes each image's tile tokens as the
        # processor does), the pixels only for the images not encoded yet.
        ids = self.token_ids([chat])[0]
        images = tuple(part for part in _images(chat) if isinstance(part, ModelImage))
        digests = tuple(image.digest for image in images)
        no_mask = torch.zeros((len(ids), 0), dtype=torch.bool)
        new = self.new_images(images, cached)
        if not new:
            return ProcessedPrompt(ids, no_mask, digests, (), {})
        inputs = self.processor.image_processor(images=[[decode(image) for image in new]], return_tensors="pt", return_row_col_info=True)
        # Each new image's tiles (and the global image), one after the other, as the processor
        # lays out one prompt's images; and how many tiles each has, to split what they become.
        tiles = torch.tensor([rows * columns + 1 for rows, columns in zip(inputs["rows"][0], inputs["cols"][0], strict=True)])
        # The mask as bool, not the processor's int64: an eighth of the bytes to carry from the prompt process.
        pixels = {"pixel_values": inputs["pixel_values"], "pixel_attention_mask": inputs["pixel_attention_mask"].bool(), "tiles": tiles}
        return ProcessedPrompt(ids, no_mask, digests, tuple(image.digest for image in new), pixels)

    def vision(self, model) -> TileVision:
        inner = model.model
        return TileVision(inner.vision_model, inner.connector, model.config.vision_config.patch_size)

    def encode_images(self, vision: torch.nn.Module, processed: ProcessedPrompt) -> list[torch.Tensor]:
        weights = floating_weights(vision)
        pixels = processed.pixels["pixel_values"].to(weights.device, weights.dtype)
        features = vision(pixels, processed.pixels["pixel_attention_mask"].to(weights.device))
        tokens = (processed.pixels["tiles"] * self.processor.image_seq_len).tolist()
        if features.shape[0] != sum(tokens):
            raise ValueError(f"{features.shape[0]} image embeddings for {sum(tokens)} image tokens")
        return [image.clone() for image in features.split(tokens)]

    def encode(self, model, processed: ProcessedPrompt) -> Prompt:
        prompt = super().encode(model, processed)
        expected, found = processed.ids.count(self.image_token_id), 0 if prompt.images is None else prompt.images.shape[0]
        if found != expected:
            raise ValueError(f"{found} image embeddings for {expected} image tokens")
        return prompt

    def prefill_inputs(self, model, rows: Sequence[Row], ids: torch.Tensor) -> tuple[dict[str, Any], CachedImages]:
        # What Idefics3's forward does with pixels (`inputs_merger`), with each row's embeddings
        # computed when it was prepared.
        with torch.inference_mode():
            embeddings = model.get_input_embeddings()(ids)
            for index, row in enumerate(rows):
                if row.prompt.images is not None:
                    places = (ids[index] == self.image_token_id)[:, None]
                    embeddings[index] = embeddings[index].masked_scatter(places, row.prompt.images.to(embeddings.dtype))
        return {"inputs_embeds": embeddings}, CachedImages()

    def image_preparation(self) -> dict[str, int]:
        return {"image_longest_edge": self.longest_edge}
