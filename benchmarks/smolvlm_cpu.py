"""How fast SmolVLM-256M-Instruct answers on this machine's CPU, measured on the architecture at its real
size with random weights (the weights can't be downloaded here; speed doesn't depend on their values).

The model is an Idefics3 with SmolVLM-256M's published dimensions (SigLIP-B/16 at 512 px, pixel
shuffle 4, so 64 tokens a tile; SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 key-value heads),
saved and loaded through `from_pretrained` like the real one, and served by the local backend. It
answers one question about a 640 x 480 photo (cut into 4 x 3 tiles of 512 px and the global image:
about 850 image tokens), with a reply of fixed length. Prints the time to the first token (prefill:
the vision encoder on 13 tiles, and the prompt) and the decoding speed, for one request and for
four text questions at once. `--case follow-up` times the first token of a follow-up question in the
same conversation (the photo comes back with the history): with the photo in the image cache, and,
for comparison, the same conversation about a photo the backend has not seen. `--case beside` asks
about a photo while another reply streams, and prints that reply's longest silence and the photo's
first token: with the vision encoder on the model's worker (the prompt process off), and run by the
prompt process on the core the worker leaves free (`--threads 1` on a 2-core machine).

    python benchmarks/smolvlm_cpu.py [--threads 1] [--tokens 48] [--case follow-up|beside]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import itertools
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image
from transformers import LogitsProcessor

from ground.images import ModelImage
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.service import Chat, GenerationParams, GenerationRequest, Message
from model.tiny import SMOLVLM_CHAT_TEMPLATE, _byte_level_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_length import NoEarlyEnd


def write_smolvlm_256m(directory: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _byte_level_tokenizer(vocab_size=768, seed=0)  # the text is random anyway; the model keeps its 49,280 rows
    config = Idefics3Config(
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
        text_config={
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49280,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
        },
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Idefics3ForConditionalGeneration(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M")
    model.save_pretrained(directory)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64, chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def photo() -> ModelImage:
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 40).convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    return ModelImage(hashlib.sha256(data).hexdigest(), data, "photo.png")


async def answer(service: LocalBackend, request: GenerationRequest) -> float:
    """Seconds from submitting `request` to its last token."""
    started = time.perf_counter()
    await service.generate(request)
    return time.perf_counter() - started


def conversation(image: ModelImage) -> tuple[Chat, Chat]:
    """A question about `image`, and a follow-up in the same conversation (the history, photo and all)."""
    question = Chat((Message("user", (image, "What is in this image?")),))
    return question, Chat((*question.messages, Message("assistant", ("A field of grey noise.",)), Message("user", ("Is there a pattern in it?",))))


async def first_token(service: LocalBackend, chat: Chat) -> float:
    return await answer(service, GenerationRequest(chat, GenerationParams(max_new_tokens=1)))


async def follow_up(service: LocalBackend) -> None:
    await first_token(service, conversation(photo())[0])  # warm-up, another photo
    question, again = conversation(photo())
    first = await first_token(service, question)
    cached = await first_token(service, again)
    unseen = await first_token(service, conversation(photo())[1])
    threads = torch.get_num_threads()
    print(f"first question about a photo: first token after {first:.1f} s")
    print(f"follow-up about the same photo (image cache): first token after {cached:.1f} s")
    print(f"the same follow-up about a photo not seen before: first token after {unseen:.1f} s")
    print(f"(torch threads: {threads}; float32; random weights at SmolVLM-256M's size; load average {os.getloadavg()[0]:.2f})")


class StepClock(LogitsProcessor):
    """Notes when the rows it is given to choose their next token (the moments of decoding steps),
    and sets `decoding` on `loop` at the 8th."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.moments: list[float] = []
        self.decoding = asyncio.Event()
        self._loop = loop

    def __call__(self, input_ids, scores):
        self.moments.append(time.perf_counter())
        if len(self.moments) == 8:
            self._loop.call_soon_threadsafe(self.decoding.set)
        return scores


async def beside_a_reply(service: LocalBackend, clock: StepClock) -> tuple[float, float]:
    """A photo question arriving while a text reply decodes: the seconds to the photo's first token,
    and the reply's longest pause between two decoding steps meanwhile (the clock's, not its text:
    random weights write bytes that are not always UTF-8, which the stream holds back)."""
    reply = service.stream(GenerationRequest(Chat((Message("user", ("Tell me a long story.",)),)), GenerationParams(max_new_tokens=4000)))
    await anext(reply)  # queued; what it streams from here on waits in its queue, unread
    await clock.decoding.wait()
    asked = time.perf_counter()
    waited = await first_token(service, conversation(photo())[0])
    await reply.aclose()
    moments = [asked, *(moment for moment in clock.moments if asked < moment < asked + waited), asked + waited]
    return waited, max(later - earlier for earlier, later in itertools.pairwise(moments))


async def beside(checkpoint: Path, threads: int) -> None:
    """`beside_a_reply` with the prompt process off and on."""
    for apart in (False, True):
        settings = BatchSettings(threads=threads, stall_timeout_s=3600, prompt_process=apart)
        service = await LocalBackend.open(CheckpointSettings(str(checkpoint), dtype="float32"), settings)
        try:
            await first_token(service, Chat((Message("user", ("Hello!",)),)))  # warm-up
            no_end, clock = NoEarlyEnd(sorted(service.family.end_ids)), StepClock(asyncio.get_running_loop())
            service.row_processors += [partial(_same, no_end), partial(_same, clock)]
            waited, silence = await beside_a_reply(service, clock)
            where = "the prompt process, on the spare core" if service.prompt_process and service.prompt_process.encodes else "the model's worker"
        finally:
            await service.close()
        print(
            f"vision encoder on {where}: a photo question beside a decoding reply gets its first token after {waited:.1f} s; "
            f"the reply's longest pause between two tokens meanwhile {silence:.2f} s"
        )
    print(f"(torch threads: {threads}; float32; random weights at SmolVLM-256M's size; load average {os.getloadavg()[0]:.2f})")


def _same(processor: LogitsProcessor, prompt_ids: list[int]) -> LogitsProcessor:
    """A row processor factory that gives every row `processor`."""
    return processor


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--case", choices=["question", "follow-up", "beside"], default="question")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_smolvlm_256m(Path(directory))
        if args.case == "beside":
            await beside(checkpoint, args.threads)
            return
        service = await LocalBackend.open(CheckpointSettings(str(checkpoint), dtype="float32"), BatchSettings(threads=args.threads, stall_timeout_s=3600))
        try:
            no_end = NoEarlyEnd(sorted(service.family.end_ids))
            service.row_processors.append(lambda prompt_ids: no_end)
            if args.case == "follow-up":
                await follow_up(service)
                return
            question = Chat((Message("user", (photo(), "What is in this image?")),))
            print(f"prompt: {await service.count_tokens(question)} tokens")
            # The first token needs the prefill (vision encoder on every tile, then the prompt); the rest decode.
            await answer(service, GenerationRequest(question, GenerationParams(max_new_tokens=1)))  # warm-up
            first = await answer(service, GenerationRequest(question, GenerationParams(max_new_tokens=1)))
            total = await answer(service, GenerationRequest(question, GenerationParams(max_new_tokens=args.tokens)))
            print(f"one question about the photo: first token after {first:.1f} s, then {(args.tokens - 1) / max(total - first, 1e-9):.1f} tokens/s")
            # Four follow-up questions without a new image, at once: decoding shared by the running batch.
            text = GenerationRequest(Chat((Message("user", ("Tell me more about it.",)),)), GenerationParams(max_new_tokens=args.tokens))
            slowest = max(await asyncio.gather(*(answer(service, text) for _ in range(4))))
            print(f"four text questions at once: all {4 * args.tokens} tokens in {slowest:.2f} s ({4 * args.tokens / slowest:.1f} tokens/s in all)")
            print(f"(torch threads: {args.threads}; float32; random weights at SmolVLM-256M's size; machine shared, so noisy)")
        finally:
            await service.close()


if __name__ == "__main__":
    asyncio.run(main())
