"""What differs between the IDEFICS generations the local backend serves, in one place per family.

The running batch (model/batch.py) and its scheduler (model/local.py) are the same for every family;
a `Family` says how a `Chat` becomes this model's input (its prompt format, its token count, its
images through the processor and vision encoder, once per image while the backend's `ImageCache`
keeps it) and how a batch's rows carry
their images through the prefill and the decoding steps (`RowImages`, which rows take along as they
leave and join). The checkpoint's config says which family it is (`model_type`).
"""

from __future__ import annotations

import abc
import copy
import os
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ground.images import ModelImage
from model.image_cache import ImageCache
from model.service import END_OF_UTTERANCE, Chat, Part

if TYPE_CHECKING:  # the bot imports the list of families without loading torch
    import torch

    from model.batch import Prompt, Row, RowImages

# What the local backend serves, by the config's model_type, as a refusal names them.
SUPPORTED = {
    "idefics": "IDEFICS v1 (IdeficsForVisionText2Text: HuggingFaceM4/idefics-9b-instruct, idefics-80b-instruct)",
    "idefics3": (
        "Idefics3 and SmolVLM (Idefics3ForConditionalGeneration: HuggingFaceM4/Idefics3-8B-Llama3, "
        "HuggingFaceTB/SmolVLM-256M-Instruct, SmolVLM-500M-Instruct, SmolVLM-Instruct)"
    ),
}


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt through the processor, before the model sees it: token ids, which images each token
    sees, and the pixels of the images the image cache doesn't hold (CPU work, done in the prompt
    process (model/prompt_process.py) or on the worker; the vision encoder then runs in
    `Family.encode`). Images go by their digest: their bytes stay with whoever asked."""

    ids: list[int]
    image_mask: torch.Tensor  # (len(ids), images) bool; IDEFICS v1 only (Idefics3: no columns)
    images: tuple[str, ...]  # the digests of the prompt's images, in order (an image posted twice is there twice)
    new: tuple[str, ...]  # those not in the image cache, each once, in order: whose pixels `pixels` holds
    # The processor's tensors for `new`, as the family's vision encoder takes them (Idefics3: and
    # "tiles", each image's count of them); {} without new images, or once they are encoded.
    pixels: dict[str, torch.Tensor]
    # The states of `new` through the vision encoder, one tensor per image, if the prompt process
    # encoded them (a model on the CPU with a core to spare: model/prompt_process.py); () if not.
    states: tuple[torch.Tensor, ...] = ()

    def __reduce__(self):
        # Its tensors travel from the prompt process as plain bytes (numpy arrays): torch's own
        # pickling between processes hands each tensor over through shared memory, which costs more
        # than the copy for tensors of this size (measured: 2.9 ms against 1.2 ms for IDEFICS v1's pixels).
        # numpy has no bfloat16: states travel in float32, and `Family.encode` casts them back, exactly.
        pixels = {name: tensor.numpy() for name, tensor in self.pixels.items()}
        states = [state.float().numpy() for state in self.states]
        return _unpickled_prompt, (self.ids, self.image_mask.numpy(), self.images, self.new, pixels, states)


def _unpickled_prompt(ids, image_mask, images, new, pixels, states) -> ProcessedPrompt:
    import torch

    tensors = {name: torch.from_numpy(array) for name, array in pixels.items()}
    return ProcessedPrompt(ids, torch.from_numpy(image_mask), images, new, tensors, tuple(torch.from_numpy(array) for array in states))


class ImageEvicted(LookupError):
    """An image processed as cached left the image cache before `Family.encode`: process the prompt again."""


def floating_weights(vision: torch.nn.Module) -> torch.Tensor:
    """A floating-point weight of `vision` (`Family.vision`): its device and dtype are where it runs
    and what it computes in (a quantized layer's weights are packed integers)."""
    return next(weights for weights in vision.parameters() if weights.is_floating_point())


def supported_text() -> str:
    """The supported families in one sentence, for refusals."""
    return "idefics-bot serves " + " and ".join(SUPPORTED.values()) + "."


class Family(abc.ABC):
    """One generation of IDEFICS: its prompts and its images, for a loaded processor and model config."""

    name: ClassVar[str]  # the config's model_type
    model_class: ClassVar[str]  # the transformers class that loads it
    # Tokens a reply must never contain: generating one would break the image merge of later steps.
    banned_tokens: tuple[str, ...]

    def __init__(self, processor, config, image_cache: ImageCache | None = None):
        """`image_cache` keeps encoded images between prompts (none by default)."""
        self.processor = processor
        self.image_cache = ImageCache() if image_cache is None else image_cache
        self.tokenizer = processor.tokenizer
        self.config = config
        # Tokens are counted on the event loop while the worker tokenizes prompts, and a fast
        # tokenizer keeps its padding and truncation settings on the shared Rust object. So counting
        # has a tokenizer of its own.
        self._counting = copy.deepcopy(self.tokenizer)
        self._added_tokens = self.special_tokens

    # -- prompts -------------------------------------------------------------------------------

    @abc.abstractmethod
    def render(self, chat: Chat) -> list[Part]:
        """What the model receives for `chat`: its text, with the images in their places."""

    @abc.abstractmethod
    def processed_text(self, chat: Chat) -> str:
        """The text the processor tokenizes for `chat`, each image as the tokens it writes for it (any
        `ImageSlot` that is not a `ModelImage` as those of the largest image the processor makes)."""

    def count_tokens(self, chat: Chat) -> int:
        """Tokens `chat` takes in the context, images at their real cost (on the event loop)."""
        return len(self._counting(self.processed_text(chat), add_special_tokens=False).input_ids)

    def token_ids(self, chats: Sequence[Chat]) -> list[list[int]]:
        """The token ids of each chat, as the processor makes them, in one call of the tokenizer (on
        the model's worker)."""
        return self.tokenizer([self.processed_text(chat) for chat in chats], add_special_tokens=False).input_ids

    def continuation_ids(self, chat: Chat, continuations: Sequence[str]) -> list[list[int]]:
        """The token ids of `chat` continued by each of `continuations` (`Chat.continued`), as
        `token_ids` makes them. The tokenizer splits its input at added tokens and tokenizes the
        pieces apart, so the text all of them share, up to the last added token in it, is tokenized
        once, and each continuation from there on: a tenth of the work for ten labels after a long
        prompt. The first one is checked against its whole tokenization (an added token that takes the
        whitespace before it, say, would break the rule); if they differ, each is tokenized whole."""
        texts = [self.processed_text(chat.continued(text)) for text in continuations]
        shared = os.path.commonprefix(texts)  # noqa: RUF071 (characters, not path components)
        cut = max((shared.rfind(token) for token in self._added_tokens), default=-1)
        if cut > 0:
            first, head, *tails = self.tokenizer([texts[0], shared[:cut], *(text[cut:] for text in texts)], add_special_tokens=False).input_ids
            if head + tails[0] == first:
                return [head + tail for tail in tails]
        return self.tokenizer(texts, add_special_tokens=False).input_ids

    @abc.abstractmethod
    def model_inputs(self, chats: Sequence[Chat]) -> Any:
        """The processor's output for `chats` (left-padded, with pixels), as `model.generate` and a
        plain forward take it: for one-off work such as beam search and scoring."""

    @abc.abstractmethod
    def process(self, chat: Chat, cached: Container[str]) -> ProcessedPrompt:
        """`chat` through the processor: tokens, and pixels for the images whose digests are not in
        `cached` (the image cache, or what it held when the prompt was sent to the prompt process).
        CPU only: the model is not touched, so it runs in a process of its own."""

    @abc.abstractmethod
    def vision(self, model) -> torch.nn.Module:
        """The part of `model` that turns pixels into the states the language model takes for images:
        the vision encoder and what follows it, made of the model's own modules (no copy)."""

    @abc.abstractmethod
    def encode_images(self, vision: torch.nn.Module, processed: ProcessedPrompt) -> list[torch.Tensor]:
        """The states of `processed.new` through `vision` (`Family.vision`), one tensor per image, each
        as `Prompt.images` takes it concatenated with the others (on the model's worker, or in the
        prompt process with its own copy of `vision`)."""

    @staticmethod
    def new_images(images: Sequence[ModelImage], cached: Container[str]) -> tuple[ModelImage, ...]:
        """The images of `images` whose digests are not in `cached`, each once, in order."""
        return tuple(dict.fromkeys(image for image in images if image.digest not in cached))

    def cached_images(self, chat: Chat) -> frozenset[str]:
        """The digests of `chat`'s images that the image cache holds now: what the prompt process
        need not process."""
        return frozenset(part.digest for part in chat.images if isinstance(part, ModelImage) and part.digest in self.image_cache)

    def encode(self, model, processed: ProcessedPrompt) -> Prompt:
        """The processed prompt with its images' states: from the image cache, and for the new images
        from the vision encoder, unless the prompt process encoded them (kept in the cache for the
        prompts that come back with them)."""
        import torch  # here: the bot imports this module without loading torch

        from model.batch import Prompt

        image_mask = processed.image_mask.to(model.device)
        if not processed.images:
            return Prompt(processed.ids, image_mask, None)
        # The cached states are taken first: keeping the new ones may evict them.
        states = {digest: self.image_cache.get(digest) for digest in processed.images if digest not in processed.new}
        if any(part is None for part in states.values()):
            raise ImageEvicted("An image left the image cache after the prompt was processed.")
        if processed.new:
            if processed.states:  # encoded in the prompt process
                encoded = [state.to(model.device, model.dtype) for state in processed.states]
            else:
                with torch.inference_mode():
                    encoded = self.encode_images(self.vision(model), processed)
            for digest, image_states in zip(processed.new, encoded, strict=True):
                states[digest] = image_states
                self.image_cache.put(digest, image_states)
        return Prompt(processed.ids, image_mask, torch.cat(cast("list[torch.Tensor]", [states[digest] for digest in processed.images])))

    def prepare(self, model, chat: Chat) -> Prompt:
        """`chat` tokenized and its images encoded (those the image cache holds taken from it), in one call."""
        return self.encode(model, self.process(chat, self.image_cache))

    @abc.abstractmethod
    def prefill_inputs(self, model, rows: Sequence[Row], ids: torch.Tensor) -> tuple[dict[str, Any], RowImages]:
        """The forward's token and image arguments for the left-padded `ids` of `rows`, and what the
        rows keep of their images for decoding."""

    # -- what the bot needs to know ------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        return self.config.max_position_embeddings

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every token the tokenizer matches in raw text: what the bot removes from what people type."""
        tokenizer = self.tokenizer
        return tuple(sorted({*tokenizer.all_special_tokens, *(token.content for token in tokenizer.added_tokens_decoder.values())}))

    @property
    def end_ids(self) -> frozenset[int]:
        """The tokens that end a reply."""
        return frozenset({self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE), self.tokenizer.eos_token_id} - {None})

    @property
    def banned_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(token) for token in self.banned_tokens]

    @abc.abstractmethod
    def image_preparation(self) -> dict[str, int]:
        """How intake should prepare images for this processor: {"image_size": side} for a square,
        or {"image_longest_edge": edge} to keep the aspect ratio (ModelInfo's fields)."""


def pictures(chat_parts: Sequence[Part]) -> list:
    """The PIL images of a rendered prompt's image parts, in order."""
    from model.pictures import decode

    return [decode(part) for part in chat_parts if isinstance(part, ModelImage)]
