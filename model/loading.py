"""Loading an IDEFICS checkpoint (model + processor) from the hub or a directory, with readable errors.

The checkpoint's config says which family it is (model/family.py): IDEFICS v1, or Idefics3 and the
SmolVLM models built on it. Idefics2 is not served (its processor and image handling differ again,
and nothing in the bot needs it: Idefics3 supersedes it)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from model.family import SUPPORTED, supported_text
from model.service import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IDEFICS_TOKENS, IMAGE_TOKEN, ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "HuggingFaceM4/idefics-9b-instruct"
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "8bit", "4bit")

# A small checkpoint that answers at a useful speed on a CPU (README "Try it").
SMALL_CHECKPOINT = "HuggingFaceTB/SmolVLM-256M-Instruct"
_TRY_LOCALLY = (
    "To try the bot without the real weights, write a tiny random checkpoint and use it: "
    "`idefics-bot tiny-checkpoint ./tiny-idefics && idefics-bot chat --model ./tiny-idefics`."
)
# The tokens each family's prompts are made of: a tokenizer without them belongs to another model.
_PROMPT_TOKENS = {"idefics": IDEFICS_TOKENS, "idefics3": (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, "<global-img>")}


@dataclass(frozen=True)
class CheckpointSettings:
    """Where the weights come from and how they are laid out in memory."""

    checkpoint: str = DEFAULT_CHECKPOINT
    dtype: str = "auto"  # auto: bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU
    quantization: str = "none"  # 8bit / 4bit through bitsandbytes
    device_map: str | None = None  # None: "auto" with a GPU, the CPU otherwise


def resolve_dtype(name: str):
    """The torch dtype for a config name; "auto" picks what the device runs well."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_available(checkpoint: str) -> None:
    """Fail fast, before transformers spends half a minute retrying an unreachable hub."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"The model directory {path} has no config.json, so it is not a saved checkpoint. "
                "Point [model] checkpoint (or --model) at a directory written by save_pretrained, or at a hub id "
                f"such as {DEFAULT_CHECKPOINT}. {_TRY_LOCALLY}"
            )
        return
    if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1:  # hub ids are "name" or "org/name"
        raise ModelLoadError(
            f"The model directory {checkpoint} does not exist. Check [model] checkpoint (or --model). {_TRY_LOCALLY}"
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(checkpoint, "config.json")
    if isinstance(cached, str):
        return
    if not _hub_reachable():
        raise ModelLoadError(
            f"Could not load the model {checkpoint}: it is not in the local Hugging Face cache and the hub cannot be "
            "reached from here (no network, or HF_HUB_OFFLINE is set). Download it where there is network "
            f"(`huggingface-cli download {checkpoint}`) and copy the cache, or point [model] checkpoint at a local "
            f"directory. {_TRY_LOCALLY}"
        )


def _quantization_config(quantization: str, dtype):
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"quantization = \"{quantization}\" needs the bitsandbytes package, which is not installed "
            "(pip install bitsandbytes), or set [model] quantization = \"none\"."
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def load_checkpoint(settings: CheckpointSettings):
    """Load `(model, processor)` or raise `ModelLoadError` explaining what failed and what to do."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import logging as transformers_logging

    from model.families import family_for

    transformers_logging.disable_progress_bar()  # our logs are one line per event
    checkpoint = settings.checkpoint
    _check_available(checkpoint)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not read the configuration of {checkpoint}: {_first_line(exc)}. Check the hub id or directory "
            f"in [model] checkpoint. {_TRY_LOCALLY}"
        ) from exc
    if config.model_type not in SUPPORTED:
        raise ModelLoadError(f"{checkpoint} is a '{config.model_type}' model, which the bot can't serve: {supported_text()}")
    dtype = resolve_dtype(settings.dtype)
    device_map = settings.device_map or ("auto" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": dtype, "device_map": device_map}
    quantization = _quantization_config(settings.quantization, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        # The PIL image backend, whatever else is installed: image intake resizes as it does
        # (bot/images.py), so the processor's own resize of a stored image changes nothing.
        processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
        _check_tokenizer(checkpoint, processor.tokenizer, _PROMPT_TOKENS[config.model_type])
        family = family_for(processor, config)
        model = getattr(transformers, family.model_class).from_pretrained(checkpoint, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors, torch and bitsandbytes each raise their own kinds
        raise ModelLoadError(
            f"Loading {checkpoint} (dtype {str(dtype).removeprefix('torch.')}, quantization {settings.quantization}, "
            f"device_map {device_map}) failed: {_first_line(exc)}. Check that the checkpoint is complete and that "
            "the device has room for it (4-bit quantization needs about 7 GB for the 9B model)."
        ) from exc
    if processor.tokenizer.padding_side != "left":
        processor.tokenizer.padding_side = "left"  # batched generation is only correct with left padding
    model.eval()
    log.info(
        "model.loaded",
        extra={"checkpoint": checkpoint, "family": family.name, "dtype": str(dtype), "quantization": settings.quantization, "device": str(model.device)},
    )
    return model, processor


def _check_tokenizer(checkpoint: str, tokenizer, needed: tuple[str, ...]) -> None:
    """transformers makes an empty tokenizer of a directory without tokenizer files; the model would
    load and then fail every request. It must know the tokens the family's prompts are made of."""
    missing = [token for token in needed if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ModelLoadError(
            f"The tokenizer of {checkpoint} doesn't know the IDEFICS tokens {', '.join(missing)}: its tokenizer files "
            "(tokenizer.json, tokenizer_config.json) are missing or belong to another model. Copy them from the "
            "checkpoint it was made from, e.g. AutoProcessor.from_pretrained(original).save_pretrained(directory)."
        )


def prompt_family(checkpoint: str):
    """The `Family` that renders prompts for `checkpoint`, made from its config and processor without
    its weights and without the network (for `idefics-bot render`); None when the checkpoint is not
    at hand here or is IDEFICS v1, whose instruct format needs no files. `ModelLoadError` for a
    checkpoint the bot can't serve."""
    from huggingface_hub import try_to_load_from_cache

    path = Path(checkpoint).expanduser()
    config_file = path / "config.json" if path.is_dir() else try_to_load_from_cache(checkpoint, "config.json")
    if not isinstance(config_file, (str, Path)) or not Path(config_file).is_file():
        return None
    from transformers import AutoConfig, AutoProcessor

    from model.families import family_for

    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    if config.model_type not in SUPPORTED:
        raise ModelLoadError(f"{checkpoint} is a '{config.model_type}' model, which the bot can't serve: {supported_text()}")
    if config.model_type == "idefics":
        return None
    return family_for(AutoProcessor.from_pretrained(checkpoint, backend="pil", local_files_only=True), config)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")
