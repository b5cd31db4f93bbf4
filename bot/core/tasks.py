"""One-off image tasks, as the IDEFICS guide prompts them, each reachable by name.

`chat` is the instruct conversation format with a single user turn; the others are the guide's
templates (captioning, prompted captioning, visual question answering, classification, image-guided
story, few-shot) with its settings as defaults: reply lengths, and beam search for the story.
`classify` ranks the labels by likelihood instead of letting the model write freely (the guide's
form, which may name no label at all, is `classify_generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.core.conversation import Author, ImageRef, Turn
from bot.core.prompt import PromptItems, clean_text, render

TASKS = ("chat", "caption", "prompted_caption", "vqa", "classify", "classify_generate", "story", "few_shot")

# The guide's settings; chat has the reference chat demo's.
DEFAULT_MAX_NEW_TOKENS = {
    "chat": 512,
    "caption": 10,
    "prompted_caption": 10,
    "vqa": 20,
    "classify_generate": 6,  # classify generates nothing: it ranks its labels
    "story": 200,
    "few_shot": 30,
}
DEFAULT_NUM_BEAMS = {"story": 2}


class TaskError(ValueError):
    """The task can't be built from what was given; the message says what is missing."""


@dataclass(frozen=True)
class FewShotPair:
    """An example for the few-shot task: an image and the description it should get."""

    image: ImageRef
    text: str


MAX_LABELS = 50  # each is one row of the batch that weighs them
MAX_LABEL_CHARS = 100


@dataclass(frozen=True)
class TaskPrompt:
    """A task's prompt and settings. `labels`: for `classify`, the labels to rank after the prompt
    (which ends with "Category: ") instead of generating."""

    items: PromptItems
    max_new_tokens: int
    num_beams: int = 1
    labels: tuple[str, ...] = ()


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels from "cat, dog, bird" or a list: cleaned like anything typed, empty ones and repeats
    dropped; more than MAX_LABELS, or one longer than MAX_LABEL_CHARS, is refused."""
    if isinstance(labels, str):
        labels = labels.split(",", MAX_LABELS * 4)  # bounded: the excess is refused below anyway
    cleaned = list(dict.fromkeys(label for label in (" ".join(clean_text(label).split()) for label in labels) if label))
    if len(cleaned) > MAX_LABELS:
        raise TaskError(f"That's more than {MAX_LABELS} labels; please give at most {MAX_LABELS}.")
    for label in cleaned:
        if len(label) > MAX_LABEL_CHARS:
            raise TaskError(f'The label "{label[:30]}..." is {len(label)} characters long; labels can have at most {MAX_LABEL_CHARS}.')
    return cleaned


def build_task(
    task: str,
    images: Sequence[ImageRef],
    *,
    question: str = "",
    labels: Sequence[str] = (),
    examples: Sequence[FewShotPair] = (),
    system_prompt: str = "",
    max_new_tokens: dict[str, int] | None = None,
    num_beams: dict[str, int] | None = None,
) -> TaskPrompt:
    """The prompt for `task` on `images` (the guide's tasks take exactly one image; chat takes any)."""
    if task not in TASKS:
        raise TaskError(f"Unknown task '{task}'. Choose one of: {', '.join(TASKS)}.")
    question = clean_text(question)
    lengths = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
    beams = {**DEFAULT_NUM_BEAMS, **(num_beams or {})}.get(task, 1)
    if task == "chat":
        if not question and not images:
            raise TaskError("Ask a question or give an image.")
        turn = Turn("user", (*((question,) if question else ()), *images), Author("user", "user"))
        return TaskPrompt(render([turn], system_prompt), lengths[task], beams)
    if len(images) != 1:
        raise TaskError(f"The {task} task takes exactly one image ({len(images)} given).")
    image = images[0]
    if task == "caption":
        items: PromptItems = [image]
    elif task == "prompted_caption":
        items = [image, "This is an image of "]
    elif task == "vqa":
        if not question:
            raise TaskError("The vqa task needs a question.")
        items = ["Instruction: Provide an answer to the question. Use the image to answer.\n", image, f"Question: {question} Answer:"]
    elif task in ("classify", "classify_generate"):
        labels = parse_labels(labels)
        if len(labels) < 2:
            raise TaskError('The classify task needs at least two labels, e.g. "cat, dog, bird".')
        items = [
            f"Instruction: Classify the following image into a single category from the following list: {labels}.\n",
            image,
            "Category: ",
        ]
        if task == "classify":
            return TaskPrompt(items, 0, beams, tuple(labels))
    elif task == "story":
        items = ["Instruction: Use the image to write a story. \n", image, "Story: \n"]
    else:
        if not examples:
            raise TaskError("The few_shot task needs examples: add [[tasks.few_shot]] entries (image, text) to the config.")
        items = []
        for example in examples:
            items += ["User:", example.image, f"Describe this image.\nAssistant: {clean_text(example.text)}\n"]
        items += ["User:", image, "Describe this image.\nAssistant:"]
    return TaskPrompt(items, lengths[task], beams)
