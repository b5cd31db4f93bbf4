"""Classification by ranking: every label weighed after the guide's prompt, the answer always a label."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LogitsProcessor

from bot.core.ranking import rank
from bot.core.tasks import TaskError, parse_labels
from bot.runtime.app import Runtime
from ground.conversation import Author, ConversationKey
from ground.messages import Final, TaskRequest, Working
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.fake_tgi import FakeTGI
from tests.test_cli import assert_no_traceback, idefics_bot
from tests.test_engine import attachment
from tests.test_model_service import model_image

KEY = ConversationKey("test", "channel-1")
ANN = Author("u1", "Ann")
ANSWER = re.compile(r"(?P<best>[a-z ]+) \((?P<p1><1%|\d+%)\), then (?P<second>[a-z ]+) \((?P<p2><1%|\d+%)\)")


class Favour(LogitsProcessor):
    """Makes the tokens of one word likely wherever the model is asked (in place, as processors may),
    and records the batch shapes."""

    def __init__(self, tokenizer, word: str):
        self.ids = tokenizer(f"Category: {word}", add_special_tokens=False).input_ids[-1:]  # the word as it follows the cue
        self.rows: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.rows.append(input_ids.shape[0])
        scores[:, self.ids] += 30.0
        return scores


def classify_request(labels: str) -> TaskRequest:
    return TaskRequest("classify", KEY, ANN, (attachment("pet.png", image_bytes()),), labels=labels)


@pytest.fixture
async def runtime(config):
    async with Runtime.open(config) as started:
        yield started


@BOTH_FAMILIES
async def test_the_likely_label_wins_in_one_batched_pass(runtime):
    favour = Favour(runtime.model._tokenizer, "dog")
    runtime.model.row_processors.append(lambda prompt_ids: favour)
    events = [event async for event in runtime.engine.run_task(classify_request("cat, dog, bird</s>, horse"))]
    assert isinstance(events[0], Working) and isinstance(events[-1], Final)
    answer = ANSWER.fullmatch(events[-1].text)
    assert answer and answer["best"] == "dog" and answer["second"] in ("cat", "bird", "horse"), events[-1].text
    assert int(answer["p1"].rstrip("%")) >= 99
    assert favour.rows and set(favour.rows) == {4}  # all four labels in one forward pass


@BOTH_FAMILIES
async def test_without_help_the_answer_is_still_two_of_the_labels(runtime):
    labels = ["red", "green", "blue", "small car", "sky"]
    final = [event async for event in runtime.engine.run_task(classify_request(", ".join(labels)))][-1]
    answer = ANSWER.fullmatch(final.text)
    assert answer and answer["best"] in labels and answer["second"] in labels and answer["best"] != answer["second"], final.text


@pytest.mark.parametrize(
    "labels, message",
    [
        ("cat", "needs at least two labels"),
        ("<image>, </s>", "needs at least two labels"),  # nothing left once cleaned
        (", ".join(f"label {n}" for n in range(51)), "more than 50 labels"),
        ("cat, " + "x" * 101, "labels can have at most 100"),
    ],
)
async def test_label_problems_are_explained(runtime, labels, message):
    final = [event async for event in runtime.engine.run_task(classify_request(labels))][-1]
    assert final.text == "" and message in final.notes[-1]


def test_labels_are_cleaned_like_typed_text():
    assert parse_labels("cat<end_of_utterance>, dog </s>,, cat ,\nbird") == ["cat", "dog", "bird"]
    with pytest.raises(TaskError):
        parse_labels(",".join("x" for _ in range(300)))


def test_probabilities_are_normalised_over_the_labels():
    ranking = rank(["cat", "dog", "bird"], [-1.0, -2.0, -float("inf")])
    assert ranking.labels == ("cat", "dog", "bird") and abs(sum(ranking.probabilities) - 1) < 1e-9
    assert ranking.answer() == "cat (73%), then dog (27%)"
    assert rank(["a", "b"], [-float("inf"), -float("inf")]).answer() == "a (50%), then b (50%)"


async def test_classify_on_tgi_uses_the_prefill_details(tmp_path):
    async with FakeTGI() as fake:
        fake.prefill_logprob = lambda text: -0.1 if text == "dog" else -3.0
        config = write_config(
            tmp_path / "config.toml",
            f'[model]\nbackend = "tgi"\nurl = "{fake.url}"\n[state]\npath = "{tmp_path / "state" / "bot.sqlite3"}"\n',
        )
        async with Runtime.open(config) as runtime:
            final = [event async for event in runtime.engine.run_task(classify_request("cat, dog, bird"))][-1]
        assert final.text == "dog (90%), then cat (5%)", final
        scoring = [request for request in fake.generate_requests if request["parameters"].get("decoder_input_details")]
        assert len(scoring) == 3 and all(request["parameters"]["max_new_tokens"] == 1 for request in scoring)
        assert sorted(request["inputs"].rsplit("Category:", 1)[1] for request in scoring) == [" bird", " cat", " dog"]


def test_ask_prints_the_ranking_and_keeps_the_guides_form(tmp_path, tiny_checkpoint):
    (tmp_path / "pet.png").write_bytes(image_bytes())
    ranked = idefics_bot("ask", "--model", str(tiny_checkpoint), "--image", "pet.png", "--task", "classify", "--labels", "cat, dog", cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr
    assert ANSWER.fullmatch(ranked.stdout.strip()) and {ANSWER.fullmatch(ranked.stdout.strip())[key] for key in ("best", "second")} == {"cat", "dog"}
    generated = idefics_bot("ask", "--model", str(tiny_checkpoint), "--image", "pet.png", "--task", "classify_generate", "--labels", "cat, dog", cwd=tmp_path)
    assert_no_traceback(generated)
    assert not ANSWER.fullmatch(generated.stdout.strip())  # the model's own words
    missing = idefics_bot("ask", "--model", str(tiny_checkpoint), "--image", "pet.png", "--task", "classify", cwd=tmp_path)
    assert missing.returncode == 1 and "--task classify needs --labels" in missing.stderr


class Grammar(LogitsProcessor):
    """After "dog" the model says "house", after "house" it ends: "dog house" is the likely label."""

    def __init__(self, tokenizer):
        self.dog, self.house = (tokenizer(word, add_special_tokens=False).input_ids[-1] for word in ("dog", " house"))
        self.end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last = input_ids[:, -1]
        scores[last == self.dog, self.house] += 30.0
        scores[last == self.house, self.end] += 30.0
        return scores


async def test_a_label_that_begins_another_does_not_always_win(runtime):
    runtime.model.row_processors.append(lambda prompt_ids: Grammar(runtime.model._tokenizer))
    final = [event async for event in runtime.engine.run_task(classify_request("dog, dog house"))][-1]
    answer = ANSWER.fullmatch(final.text)
    assert answer and answer["best"] == "dog house" and int(answer["p1"].rstrip("%")) >= 99, final.text


@BOTH_FAMILIES
@pytest.mark.parametrize("labels", [["cat", "small dog", "a red bird"], ["dog", "dog house", "cat"]])  # the second: labels sharing tokens
async def test_scores_are_the_labels_then_their_end_with_the_image_encoded_once(runtime, labels):
    """The prefill-only request gives what a plain forward of each prompt + label (pixels and all)
    gives: packed into one row, a label sees none of the others' tokens, even those equal to its own."""
    from model.local import LocalBackend
    from model.scoring import score_continuations
    from model.service import Chat, Message

    backend: LocalBackend = runtime.model
    family = backend.family
    guide = ("Instruction: Classify the image.\n", model_image((200, 30, 30)), "Category: ")
    chat = Chat((Message("user", guide[:2]),), reply_start="Category: ", guide=guide)

    def both(model, processor):
        calls = []
        # IDEFICS v1's vision tower and perceiver; Idefics3's vision tower and connector.
        second = model.model.perceiver_resampler if hasattr(model.model, "perceiver_resampler") else model.model.connector
        hooks = [part.register_forward_hook(lambda *_: calls.append(1)) for part in (model.model.vision_model, second)]
        try:
            scored = score_continuations(model, family, chat, labels, end_ids=backend._end_ids)
        finally:
            for hook in hooks:
                hook.remove()
        ends = sorted(family.end_ids)
        prompt_ids = family.model_inputs([chat])["input_ids"][0].tolist()
        expected = []
        for label in labels:
            inputs = family.model_inputs([chat.continued(label)])
            log_probs = torch.log_softmax(model(**inputs).logits[0].float(), -1)
            ids = inputs["input_ids"][0]
            own = next(at for at, (a, b) in enumerate(zip([*prompt_ids, -1], ids.tolist())) if a != b)  # the label's first token
            label_part = sum(log_probs[position - 1, ids[position]] for position in range(own, len(ids)))
            expected.append(float(label_part + log_probs[-1, ends].logsumexp(-1)))
        return scored, expected, len(calls)

    scored, expected, calls = await backend.call_between_steps(both)
    assert calls == 2  # the vision encoder and the perceiver (connector), once each for the one image
    assert scored == pytest.approx(expected, abs=1e-4)


@BOTH_FAMILIES
async def test_scoring_is_one_forward_of_one_row(runtime):
    """The labels share one forward of the language model, as one row (the prompt's part once, then
    each label's tokens): no copy of the prompt's cache per label, nor a second forward."""
    from model.local import LocalBackend
    from model.scoring import score_continuations
    from model.service import Chat, Message

    backend: LocalBackend = runtime.model
    labels = ["cat", "dog", "dog house", "a red bird", "tree"]
    guide = ("Instruction: Classify the image.\n", model_image((30, 200, 30)), "Category: ")
    chat = Chat((Message("user", guide[:2]),), reply_start="Category: ", guide=guide)

    def scored(model, processor) -> tuple[list[float], list[int]]:
        rows: list[int] = []
        # IDEFICS v1's decoder (its vision tower runs on its own); Idefics3's text model (Llama).
        language_model = getattr(model.model, "text_model", model.model)

        def record(module, args, kwargs) -> None:
            tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            rows.append(tokens.shape[0])

        hook = language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return score_continuations(model, backend.family, chat, labels, end_ids=backend._end_ids), rows
        finally:
            hook.remove()

    scores, rows = await backend.call_between_steps(scored)
    assert rows == [1]
    assert len(scores) == len(labels) and all(score < 0 for score in scores)
