"""Beam search, as the guide runs its image-guided story: the reply is only known at the end.

Beams can't stream (the best candidate may change until the last step), and they don't fit the
running batch's one-token-per-row steps, so a beam request is one `generate` call of its own, run
between two steps of the batch; its text is cut and shown by the same rule as a streamed reply.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from model.reply_text import visible_text
from model.service import Finished, GenerationRequest


class _Progress(StoppingCriteria):
    """Reports every step (for the stall watchdog); never stops anything itself."""

    def __init__(self, on_step: Callable[[], None]):
        self._on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self._on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def search_beams(
    model,
    processor,
    inputs,
    request: GenerationRequest,
    *,
    end_ids: Collection[int],
    banned_ids: Sequence[int],
    row_processors: Sequence[Callable] = (),
    decode: Callable[[list[int]], str],
    on_step: Callable[[], None] = lambda: None,
) -> Finished:
    """The whole reply to `request` (`inputs`: its prompt through the processor) by beam search with
    `request.params.num_beams` beams. `row_processors` are the backend's logits processor factories."""
    params = request.params
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    prompt_ids = inputs["input_ids"][0].tolist()
    output = model.generate(
        **inputs,
        num_beams=params.num_beams,
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=list(end_ids),
        pad_token_id=processor.tokenizer.pad_token_id,
        bad_words_ids=[[token] for token in banned_ids],
        stopping_criteria=StoppingCriteriaList([_Progress(on_step)]),
        logits_processor=LogitsProcessorList([make(prompt_ids) for make in row_processors]),
    )
    row = output[0, len(prompt_ids) :].tolist()
    ended = next((at for at, token in enumerate(row) if token in end_ids), None)
    ids = row if ended is None else row[:ended]
    text, stopped = visible_text(decode(ids), request.stop_strings, final=True)
    return Finished(text=text, reason="stop" if stopped or ended is not None else "length", tokens=len(ids))
