"""The text rules both backends share: how IDEFICS' processor turns a prompt of text and images into the
text it tokenizes (text items stripped of spaces and joined, each image as its marker tokens), so that
token counts agree with what the model is given, locally or on a server."""

from __future__ import annotations

from collections.abc import Sequence

from model.service import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, ImageSlot


def image_markers(follows_image: bool) -> str:
    """One image's tokens: consecutive images share the <fake_token_around_image> between them."""
    return IMAGE_TOKEN + FAKE_IMAGE_TOKEN if follows_image else FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN


def marked_text(prompt: Sequence[str | ImageSlot]) -> str:
    """The text the processor tokenizes for `prompt`, without the leading <s>."""
    pieces: list[str] = []
    last_was_image = False
    for item in prompt:
        if isinstance(item, str):
            pieces.append(item.strip(" "))
        else:
            pieces.append(image_markers(last_was_image))
        last_was_image = not isinstance(item, str)
    return "".join(pieces)
