"""The running batch on the tiny checkpoint of each family (fp32): rows that join at any step, leave at
any step and wait while the batch is full get exactly the tokens of the same prompt run alone with
`generate` (Idefics3 with its images cut into tiles and whole)."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch
from transformers import LogitsProcessor

from model.batch import Batch, Row, Sampling
from model.families import family_for
from model.loading import CheckpointSettings, load_checkpoint
from model.service import Chat, Message
from tests.test_model_service import BLUE, PROMPTS, RED

PROMPTS = {
    **PROMPTS,
    "long text": Chat((Message("user", ("Describe a small dog running on the grass by the sea. " * 6,)),)),
    "two images, long": Chat(
        (Message("system", ("Be brief.",)), Message("user", ("look", BLUE, "and then at this one, which is a photo of a street", RED, "what changed?")))
    ),
}
LENGTHS = {"no image": 7, "one image": 30, "two images": 12, "long text": 22, "two images, long": 3}


class NoEnd(LogitsProcessor):
    """Forbids the end tokens, so every reply runs to its max_new_tokens."""

    def __init__(self, ends: list[int]):
        self.ends = ends

    def __call__(self, input_ids, scores):
        scores[:, self.ends] = -float("inf")
        return scores


@pytest.fixture(scope="module", params=["idefics", "idefics3", "idefics3-whole"])
def loaded(request, tiny_checkpoints):
    """The model (fp32), its family, and a processor that lets no reply end early."""
    model, processor = load_checkpoint(CheckpointSettings(str(tiny_checkpoints(request.param)), dtype="float32"))
    family = family_for(processor, model.config)
    return model, family, NoEnd(sorted(family.end_ids))


def encoded(model, family, name: str):
    return family.prepare(model, PROMPTS[name])


def alone(loaded, name: str, sampling: Sampling | None = None) -> list[int]:
    """The reply tokens of `generate` on this prompt alone (greedy), or of a batch of just this row (sampled)."""
    model, family, no_end = loaded
    if sampling is not None:
        return run(loaded, [(0, name, sampling)], max_rows=1)[0]
    inputs = family.model_inputs([PROMPTS[name]])
    output = model.generate(
        **inputs,
        max_new_tokens=LENGTHS[name],
        do_sample=False,
        bad_words_ids=[[token] for token in family.banned_ids],
        logits_processor=[no_end],
        pad_token_id=family.tokenizer.pad_token_id,
    )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def one_step(model, family, batch: Batch | None, joining: list[Row], advance) -> Batch | None:
    """A step as the backend takes it: `joining` prefilled and merged in, then one decoding step;
    `advance` chooses each row's token and keeps the rows that go on."""
    if joining:
        joined = advance(Batch.prefill(model, joining, family, family.tokenizer.pad_token_id))
        parts = [part for part in (batch, joined) if part is not None]
        batch = Batch.concatenate(parts) if parts else None
    if batch is not None:
        batch.decode(model)
        batch = advance(batch)
    return batch


def run(loaded, arrivals: list[tuple], max_rows: int, leave: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Schedule `arrivals` (step, prompt name, sampling) through one running batch as the backend does:
    before each step, rows that arrived and fit join (prefilled, then merged); after each step, rows
    that are done or told to `leave` (number: step) leave. Returns each row's reply tokens."""
    model, family, no_end = loaded
    leave = leave or {}
    waiting = deque(enumerate(arrivals))
    batch: Batch | None = None
    replies: dict[int, Row] = {}
    step = 0

    def advance(part: Batch) -> Batch | None:
        part.choose(family.banned_ids)
        keep = [index for index, row in enumerate(part.rows) if row.generated < row.max_new_tokens and leave.get(row.owner, -1) != step]
        return part.select(keep) if keep else None

    while waiting or batch is not None:
        joining = []
        while waiting and waiting[0][1][0] <= step and len(joining) + (len(batch) if batch else 0) < max_rows:
            number, (_, name, sampling) = waiting.popleft()
            prompt = encoded(model, family, name)
            row = Row(number, prompt, LENGTHS[name], sampling or Sampling(), [no_end])
            replies[number] = row
            joining.append(row)
        batch = one_step(model, family, batch, joining, advance)
        step += 1
    return {number: row.ids[len(row.prompt.ids) :] for number, row in replies.items()}


NAMES = list(PROMPTS)


@pytest.mark.parametrize(
    "arrival_steps, max_rows",
    [
        pytest.param([0, 0, 0, 0, 0], 8, id="all at step 0"),
        pytest.param([0, 2, 5, 9, 14], 8, id="joining mid-flight"),
        pytest.param([0, 0, 1, 1, 3], 2, id="batch full, the rest queue"),
        pytest.param([3, 0, 0, 8, 8], 3, id="mixed"),
    ],
)
def test_every_row_gets_the_tokens_it_gets_alone(loaded, arrival_steps, max_rows):
    replies = run(loaded, [(step, name, None) for step, name in zip(arrival_steps, NAMES)], max_rows)
    for number, name in enumerate(NAMES):
        assert replies[number] == alone(loaded, name), name


def test_a_row_that_leaves_early_changes_nobody_elses_tokens(loaded):
    replies = run(loaded, [(0, name, None) for name in NAMES], max_rows=8, leave={1: 4, 3: 0})
    assert len(replies[1]) == 6 and len(replies[3]) == 1  # the first token comes from the prefill
    for number, name in enumerate(NAMES):
        expected = alone(loaded, name)
        assert replies[number] == expected[: len(replies[number])], name


def test_sampled_and_greedy_rows_share_a_batch(loaded):
    hot = Sampling(do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    strict = Sampling(do_sample=True, temperature=0.3, top_p=0.5, repetition_penalty=1.3, seed=11)
    arrivals = [(0, "one image", hot), (0, "no image", None), (2, "long text", strict), (4, "two images", None)]
    replies = run(loaded, arrivals, max_rows=8)
    assert replies[0] == alone(loaded, "one image", hot)
    assert replies[2] == alone(loaded, "long text", strict)
    assert replies[1] == alone(loaded, "no image") and replies[3] == alone(loaded, "two images")
    # The seed decides: another one gives another reply, the settings matter.
    other = run(loaded, [(0, "one image", Sampling(do_sample=True, temperature=1.5, top_p=0.9, seed=8))], max_rows=1)[0]
    assert other != replies[0]


@pytest.mark.parametrize("name", ["one image", "two images"])
def test_a_seeded_sampled_row_gets_the_tokens_of_generate_with_that_seed(loaded, name):
    """generate samples after temperature, top_k (50 by default) and top_p; so does a row."""
    model, family, no_end = loaded
    hot = Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=5)
    inputs = family.model_inputs([PROMPTS[name]])
    torch.manual_seed(hot.seed)
    output = model.generate(
        **inputs,
        max_new_tokens=LENGTHS[name],
        do_sample=True,
        temperature=hot.temperature,
        top_p=hot.top_p,
        bad_words_ids=[[token] for token in family.banned_ids],
        logits_processor=[no_end],
        pad_token_id=family.tokenizer.pad_token_id,
    )
    assert alone(loaded, name, hot) == output[0, inputs["input_ids"].shape[1] :].tolist()


def test_splitting_and_merging_keep_the_cache_consistent(loaded):
    """Rows split into halves (as when a step fails) and merged back go on as if nothing happened."""
    model, family, no_end = loaded
    rows = [Row(name, encoded(model, family, name), LENGTHS[name], Sampling(), [no_end]) for name in NAMES]
    batch = Batch.prefill(model, rows, family, family.tokenizer.pad_token_id)
    batch.choose(family.banned_ids)
    for _ in range(2):
        first, second = batch.split()
        for part in (first, second):
            part.decode(model)
            part.choose(family.banned_ids)
        batch = Batch.concatenate([second, first])
    assert [row.owner for row in batch.rows] == [NAMES[4], *NAMES[:4]]  # halves swapped twice
    for row in batch.rows:
        assert row.ids[len(row.prompt.ids) :] == alone(loaded, row.owner)[:3]


def test_a_failed_step_leaves_the_batch_as_it_was(loaded):
    model, family, no_end = loaded
    rows = [Row(name, encoded(model, family, name), 4, Sampling(), [no_end]) for name in NAMES[:3]]
    batch = Batch.prefill(model, rows, family, family.tokenizer.pad_token_id)
    batch.choose(family.banned_ids)
    length = batch.length

    class Broken:
        config = model.config

        def __call__(self, **inputs):
            model(**inputs)  # the cache takes the new column, then the step fails
            raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError):
        batch.decode(Broken())
    assert batch.length == length and all(layer.keys.shape[-2] == length for layer in batch.cache.layers)
    for _ in range(3):
        batch.decode(model)
        batch.choose(family.banned_ids)
    for row in batch.rows:
        assert row.ids[len(row.prompt.ids) :] == alone(loaded, row.owner)[:4]


def test_incremental_text_equals_decoding_the_whole_reply(loaded):
    from model.streamer import IncrementalText

    tokenizer = loaded[1].tokenizer
    byte_ids = frozenset(tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in range(256)]))
    rng = random.Random(3)
    words = [token for token in range(3, len(tokenizer)) if token not in byte_ids]
    for _ in range(30):
        ids = [rng.choice(sorted(byte_ids)) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randint(1, 60))]
        text = IncrementalText(lambda part: tokenizer.decode(part, skip_special_tokens=True), byte_ids)
        for token in ids:
            text.add(token)
            assert tokenizer.decode(text.ids, skip_special_tokens=True).startswith(text.text)
        assert text.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_images_go_through_the_vision_encoder_and_perceiver_once(loaded):
    model = loaded[0]
    calls = []
    # IDEFICS v1's vision tower and perceiver; Idefics3's vision tower and connector.
    second = model.model.perceiver_resampler if hasattr(model.model, "perceiver_resampler") else model.model.connector
    hooks = [part.register_forward_hook(lambda *_: calls.append(1)) for part in (model.model.vision_model, second)]
    try:
        replies = run(loaded, [(0, "two images", None)], max_rows=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(replies[0]) == LENGTHS["two images"] and len(calls) == 2  # one run each, for both images at once
    assert torch.equal(torch.tensor(replies[0]), torch.tensor(alone(loaded, "two images")))


def beams_alone(loaded, name: str, num_beams: int, max_new_tokens: int, ends: bool) -> list[int]:
    """The reply tokens of `generate(num_beams=...)` on this prompt alone, cut like a beam reply."""
    model, family, no_end = loaded
    inputs = family.model_inputs([PROMPTS[name]])
    output = model.generate(
        **inputs,
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(family.end_ids),
        bad_words_ids=[[token] for token in family.banned_ids],
        logits_processor=[] if ends else [no_end],
        pad_token_id=family.tokenizer.pad_token_id,
    )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("ends", [False, True], ids=["to the token limit", "ending on their own"])
def test_beam_rows_get_the_tokens_of_generate_with_beams_among_other_rows(loaded, ends):
    """Searches of 2 and 3 beams join a running batch at different steps, beside greedy rows."""
    from model.beams import BeamSearch

    model, family, no_end = loaded
    arrivals = {0: ["one image", "no image"], 2: ["two images"], 5: ["long text"]}
    beams = {"one image": 2, "two images": 3, "long text": 2}
    searches: dict[str, BeamSearch] = {}

    def advance(part: Batch) -> Batch | None:
        part.choose(family.banned_ids)
        keep = [i for i, row in enumerate(part.rows) if not (row.beams.done if row.beams else row.generated >= row.max_new_tokens)]
        return part.select(keep) if keep else None

    batch: Batch | None = None
    step = 0
    while step <= max(arrivals) or batch is not None:
        joining: list[Row] = []
        for name in arrivals.get(step, []):
            prompt = encoded(model, family, name)
            if name in beams:
                processors = [] if ends else [no_end]
                search = searches[name] = BeamSearch(
                    prompt.ids, beams[name], LENGTHS[name] + 9, end_ids=sorted(family.end_ids), banned_ids=family.banned_ids, processors=processors
                )
                search.rows = [Row(name, prompt, LENGTHS[name] + 9, beams=search) for _ in range(beams[name])]
                joining += search.rows
            else:
                joining.append(Row(name, prompt, LENGTHS[name], Sampling(), [no_end]))
        batch = one_step(model, family, batch, joining, advance)
        step += 1
    for name, search in searches.items():
        assert search.done
        expected = beams_alone(loaded, name, beams[name], LENGTHS[name] + 9, ends)
        got = search.best()
        assert got == expected[: len(got)] and set(expected[len(got) :]) <= {family.tokenizer.pad_token_id}, name


def test_a_beam_search_prefilled_again_mid_way_goes_on_from_its_beams(loaded):
    """A search's rows that wait after an out of memory are prefilled again with their beams so far
    (which the search rewrites at its steps, and which rows read from it only when asked), and the
    reply is still generate's."""
    from model.beams import BeamSearch

    model, family, no_end = loaded
    name, length = "one image", LENGTHS["one image"] + 9
    prompt = encoded(model, family, name)
    search = BeamSearch(prompt.ids, 2, length, end_ids=sorted(family.end_ids), banned_ids=family.banned_ids, processors=[no_end])
    search.rows = [Row(name, prompt, length, beams=search) for _ in range(2)]
    batch = Batch.prefill(model, search.rows, family, family.tokenizer.pad_token_id)
    batch.choose(family.banned_ids)
    for _ in range(5):
        batch.decode(model)
        batch.choose(family.banned_ids)
    assert [len(row.ids) - len(prompt.ids) for row in search.rows] == [6, 6]
    for row in search.rows:
        row.cached = 0  # what the backend's put-back does
    batch = Batch.prefill(model, search.rows, family, family.tokenizer.pad_token_id)
    batch.choose(family.banned_ids)
    while not search.done:
        batch.decode(model)
        batch.choose(family.banned_ids)
    assert search.best() == beams_alone(loaded, name, 2, length, ends=False)


@pytest.mark.parametrize("name", ["no image", "one image", "two images", "two images, long", "a link", "after an end"])
def test_a_processed_prompt_is_what_the_processor_gives(loaded, name):
    """`process` (the preparing thread's part: tokens, the image mask, pixels) gives exactly what the
    family's processor gives for the prompt; IDEFICS v1's image mask without the processor's loop."""
    _, family, _ = loaded
    end = family.tokenizer.eos_token
    prompts = {
        **PROMPTS,
        "a link": Chat((Message("user", ("https://example.com/cat.png", RED)),)),
        "after an end": Chat((Message("user", (RED, f"first {end} second", BLUE, f"third {end} fourth")),)),
    }
    processed = family.process(prompts[name], family.image_cache)
    inputs = family.model_inputs([prompts[name]])
    assert processed.ids == inputs["input_ids"][0].tolist()
    if "image_attention_mask" in inputs:  # IDEFICS v1: the processor pads to at least one image
        images = processed.image_mask.shape[1]
        assert torch.equal(processed.image_mask, inputs["image_attention_mask"][0, :, :images].bool())
        assert images == 0 or torch.equal(processed.pixels["pixel_values"], inputs["pixel_values"][0, :images])
    else:
        for key in {"pixel_values", "pixel_attention_mask"} & inputs.keys():
            assert torch.equal(processed.pixels[key], inputs[key].to(processed.pixels[key].dtype))  # the mask as bool
        assert processed.pixels.keys() <= {"pixel_values", "pixel_attention_mask", "tiles"}
