"""A tiny, randomly initialised IDEFICS checkpoint, written offline in well under a second.

It has the real architecture (vision tower, perceiver resampler, gated cross-attention), a small BPE
tokenizer in the Llama layout with the three IDEFICS special tokens, and a processor, so it loads
through the same `from_pretrained` path as the real model. Its replies are random bytes: it is for
trying the bot and for tests, not for answers. Every Linear layer has an input size that is a
multiple of 64 and an output size that is a multiple of 32, so 4-bit and 8-bit loading work on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.service import IDEFICS_TOKENS

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


def write_tiny_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write model, tokenizer and processor to `directory` (created if needed) and return its path."""
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
