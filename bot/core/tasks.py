"""One-off image tasks, as the IDEFICS guide prompts them, each reachable by name.

`chat` is a conversation of a single user turn; the others are the guide's templates (captioning,
prompted captioning, visual question answering, classification, image-guided story, few-shot) with
its settings as defaults: reply lengths, and beam search for the story. Each is a `Chat`: IDEFICS v1
reads the guide's own items (`Chat.guide`); chat-templated models read the same instruction as a user
message, and the guide's cue ("Category: ") as the start of their reply.
`classify` ranks the labels by likelihood instead of letting the model write freely (the guide's
form, which may name no label at all, is `classify_generate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from bot.core.prompt import chat_of, clean_text
from ground.conversation import Author, ImageRef, Turn
from model.service import Chat, Message, Part

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


Name = TypeVar("Name", bound=str)  # a task's name: a str, or the config's TaskName


def task_length(task: Name, overrides: Mapping[Name, int] | None = None) -> int:
    """The reply budget of `task`: `overrides`' ([tasks] max_new_tokens) if it names the task, else
    the default."""
    return overrides[task] if overrides and task in overrides else DEFAULT_MAX_NEW_TOKENS[task]


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
    (whose reply starts with "Category: ") instead of generating."""

    chat: Chat
    max_new_tokens: int
    num_beams: int = 1
    labels: tuple[str, ...] = ()


def parse_labels(labels: str | Sequence[str], special_tokens: Iterable[str] = ()) -> list[str]:
    """Labels from "cat, dog, bird" or a list: cleaned like anything typed (of `special_tokens` too),
    empty ones and repeats dropped; more than MAX_LABELS, or one longer than MAX_LABEL_CHARS, is refused."""
    if isinstance(labels, str):
        labels = labels.split(",", MAX_LABELS * 4)  # bounded: the excess is refused below anyway
    specials = tuple(special_tokens)
    cleaned = list(dict.fromkeys(label for label in (" ".join(clean_text(label, specials).split()) for label in labels) if label))
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
    special_tokens: Iterable[str] = (),
) -> TaskPrompt:
    """The prompt for `task` on `images` (the guide's tasks take exactly one image; chat takes any);
    what people typed is cleaned of the model's `special_tokens` too."""
    if task not in TASKS:
        raise TaskError(f"Unknown task '{task}'. Choose one of: {', '.join(TASKS)}.")
    specials = tuple(special_tokens)
    question = clean_text(question, specials)
    beams = {**DEFAULT_NUM_BEAMS, **(num_beams or {})}.get(task, 1)
    if task == "chat":
        if not question and not images:
            raise TaskError("Ask a question or give an image.")
        turn = Turn("user", (*((question,) if question else ()), *images), Author("user", "user"))
        return TaskPrompt(chat_of([turn], system_prompt), task_length(task, max_new_tokens), beams)
    if len(images) != 1:
        raise TaskError(f"The {task} task takes exactly one image ({len(images)} given).")
    image = images[0]
    # (the guide's items for IDEFICS v1; the same as chat messages; the start of the reply)
    items: list[Part]
    messages: list[Message]
    cue = ""
    if task == "caption":
        items, messages = [image], [Message("user", (image, "Write a short caption for this image."))]
    elif task == "prompted_caption":
        cue = "This is an image of "
        items, messages = [image, cue], [Message("user", (image, "Write a short caption for this image."))]
    elif task == "vqa":
        if not question:
            raise TaskError("The vqa task needs a question.")
        instruction = "Instruction: Provide an answer to the question. Use the image to answer.\n"
        items = [instruction, image, f"Question: {question} Answer:"]
        messages, cue = [Message("user", (instruction, image, f"Question: {question}"))], "Answer:"
    elif task in ("classify", "classify_generate"):
        labels = parse_labels(labels, specials)
        if len(labels) < 2:
            raise TaskError('The classify task needs at least two labels, e.g. "cat, dog, bird".')
        instruction = f"Instruction: Classify the following image into a single category from the following list: {labels}.\n"
        cue = "Category: "
        items, messages = [instruction, image, cue], [Message("user", (instruction, image))]
        if task == "classify":
            return TaskPrompt(Chat(tuple(messages), cue, tuple(items)), 0, beams, tuple(labels))
    elif task == "story":
        instruction, cue = "Instruction: Use the image to write a story. \n", "Story: \n"
        items, messages = [instruction, image, cue], [Message("user", (instruction, image))]
    else:
        if not examples:
            raise TaskError("The few_shot task needs examples: add [[tasks.few_shot]] entries (image, text) to the config.")
        items, messages = [], []
        for example in examples:
            answer = clean_text(example.text, specials)
            items += ["User:", example.image, f"Describe this image.\nAssistant: {answer}\n"]
            messages += [Message("user", (example.image, "Describe this image.")), Message("assistant", (answer,))]
        items += ["User:", image, "Describe this image.\nAssistant:"]
        messages.append(Message("user", (image, "Describe this image.")))
    return TaskPrompt(Chat(tuple(messages), cue, tuple(items)), task_length(task, max_new_tokens), beams)
