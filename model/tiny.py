"""A tiny, randomly initialised IDEFICS checkpoint, written offline in well under a second.

Of either family (model/family.py). IDEFICS v1 has the real architecture (vision tower, perceiver
resampler, gated cross-attention), a small BPE tokenizer in the Llama layout with the three IDEFICS
special tokens, and a processor. Idefics3 has SmolVLM's layout: a SigLIP-like vision tower, the pixel
shuffle connector and a Llama text model, a byte-level BPE tokenizer with SmolVLM's special tokens,
an image processor that cuts tiles, and SmolVLM's chat template. Either loads through the same
`from_pretrained` path as the real model. Its replies are random bytes: it is for
trying the bot and for tests, not for answers. Every Linear layer has an input size that is a
multiple of 64 and an output size that is a multiple of 32, so 4-bit and 8-bit loading work on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.service import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IDEFICS_TOKENS, IMAGE_TOKEN

FAMILIES = ("idefics", "idefics3")

# The chat template SmolVLM's checkpoints ship (the "<|im_start|>" is literal text, not a token the
# tokenizer adds; a `content` that is a plain string is dropped).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# SmolVLM's tokenizer's specials: SmolLM2's, the image markers, and a token for each tile of a 6 x 6 grid.
SMOLVLM_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    END_OF_UTTERANCE,
    "<global-img>",
    *(f"<row_{row}_col_{column}>" for row in range(1, 7) for column in range(1, 7)),
)

_WORDS = (
    "the a an of in on at is are was what who which this that these those and or with without user assistant "
    "image picture photo describe question answer category story dog cat bird horse car house tree sky sea "
    "red green blue yellow white black small big running sitting standing ground grass street people man woman"
).split()


def _tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(3000)]
    byte_fallback = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_fallback], show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = LlamaTokenizer(vocab=trained["vocab"], merges=merges, pad_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS_TOKENS)})
    return tokenizer, len(trained["vocab"])


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, family: str = "idefics", image_splitting: bool = True) -> Path:
    """Write model, tokenizer and processor of `family` (one of FAMILIES) to `directory` (created if
    needed) and return its path. `image_splitting`: whether Idefics3's processor cuts images into tiles."""
    if family == "idefics3":
        return _write_idefics3(Path(directory), seed, image_splitting)
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer, base_vocab = _tokenizer(vocab_size=640, seed=seed)
    image_size = 30
    config = IdeficsConfig(
        vocab_size=base_vocab,
        additional_vocab_size=len(IDEFICS_TOKENS),  # every added token needs an embedding row
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_layer_interval=1,
        initializer_range=0.2,  # with the usual 0.02 the image barely moves the output
        alpha_initializer="ones",  # open the cross-attention gates so images matter
        use_resampler=True,
        vision_config={
            "embed_dim": 64,
            "image_size": image_size,
            "patch_size": 6,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 32,
        },
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config)
    model.save_pretrained(directory)
    IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=image_size), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _byte_level_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer like SmolLM2's (no <unk>, no byte-fallback tokens, no <s> added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(3000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *SMOLVLM_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=list(SMOLVLM_TOKENS),
    )


def _write_idefics3(directory: Path, seed: int, image_splitting: bool) -> Path:
    """A tiny Idefics3 in SmolVLM's layout: 64-pixel tiles of 16-pixel patches, shuffled by 2, so 4
    <image> tokens a tile; images are scaled to a longest edge of 128, so up to 2 x 2 tiles and the
    global image. Every Linear input is a multiple of 64 and output of 32 (bitsandbytes on CPU)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_tokenizer(vocab_size=768, seed=seed)
    tile, patch, shuffle = 64, 16, 2
    config = Idefics3Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": tile, "patch_size": patch},
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 8192,  # SmolVLM's context
            "initializer_range": 0.2,  # with the usual 0.02 the image barely moves the output
            "pad_token_id": tokenizer.pad_token_id,
        },
        scale_factor=shuffle,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=image_splitting)
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=(tile // patch) ** 2 // shuffle**2, chat_template=SMOLVLM_CHAT_TEMPLATE
    )
    processor.save_pretrained(directory)
    return directory
