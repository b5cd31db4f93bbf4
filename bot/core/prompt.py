"""Turning a conversation into the model's input (a `Chat` of messages, which the model service
renders in its model's format), within the model's context.

Anything a person typed is cleaned first, and so is every reply of the model before it goes back into
a prompt, so neither can inject the tokenizer's special tokens (image markers, end of utterance, end of
document) nor forge turns. The special tokens are those every IDEFICS tokenizer has (SPECIAL_TOKENS)
and those of the loaded model's own (`ModelInfo.special_tokens`: Idefics3 adds "<|im_start|>",
"<global-img>", the "<row_R_col_C>" tile tokens), passed in as `special_tokens`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from ground.conversation import Turn
from model.service import SPECIAL_TOKENS, Chat, Message

# A line that starts like a turn ("Assistant:", "User:") would let a user write the model's lines.
_FORGED_TURN = re.compile(r"(?im)^([ \t]*)(user|assistant)([ \t]*):")
_CONTROL = {"Cc", "Cs", "Co"}
# Format characters (zero-width joiners, direction marks) stay inside text, where scripts and emoji
# need them; but a message of nothing else is empty to whoever reads it.
_INVISIBLE = {"Cf", "Zs", "Zl", "Zp", "Cc"}


class _Specials:
    """A set of special tokens, ready to be cut out of text."""

    def __init__(self, tokens: frozenset[str]):
        self.pattern = re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))
        self.ending = {end: tuple(token for token in tokens if token.endswith(end)) for end in {token[-1] for token in tokens}}


@functools.lru_cache(maxsize=8)
def _specials(extra: frozenset[str]) -> _Specials:
    return _Specials(frozenset(SPECIAL_TOKENS) | {token for token in extra if token})


def without_special_tokens(text: str, special_tokens: Iterable[str] = ()) -> str:
    """`text` without special tokens, including those that removing one would assemble
    ("<ima<image>ge>"). One pass, in time linear in the text: a token is cut as soon as its last
    character arrives, so what is kept never contains one."""
    specials = _specials(frozenset(special_tokens))
    if specials.pattern.search(text) is None:
        return text
    kept: list[str] = []
    for character in text:
        kept.append(character)
        for token in specials.ending.get(character, ()):
            if len(kept) >= len(token) and "".join(kept[-len(token) :]) == token:
                del kept[-len(token) :]
                break
    return "".join(kept)


def clean_text(text: str, special_tokens: Iterable[str] = ()) -> str:
    """User text made safe for the prompt: every special token of the tokenizer (and `special_tokens`)
    removed (repeatedly, so that removing one can't assemble another), turn prefixes at line starts
    defused, control characters dropped; "" if nothing visible is left."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in _CONTROL)
    text = without_special_tokens(text, special_tokens)
    text = _FORGED_TURN.sub(r"\1\2\3 :", text).strip()
    return text if any(unicodedata.category(ch) not in _INVISIBLE for ch in text) else ""


def clean_name(name: str, special_tokens: Iterable[str] = ()) -> str:
    """A display name fit to stand in a user turn: one line, no brackets, at most 40 characters."""
    name = " ".join(clean_text(name, special_tokens).replace("[", "(").replace("]", ")").split())
    return name[:40] or "someone"


def chat_of(turns: Sequence[Turn], system_prompt: str = "", shared: bool = False, special_tokens: Iterable[str] = ()) -> Chat:
    """The model's `Chat` for `turns` (the system prompt first, if any), images as references.

    User text in turns is expected to be cleaned already (it is cut free of `special_tokens` again:
    it may have been stored while another model was loaded); the assistant's replies are cleaned
    here, since a reply can spell a special token in ordinary tokens that the tokenizer would read
    back as the special itself. In `shared` conversations each user message names its speaker, so
    the model can tell people apart.
    """
    specials = tuple(special_tokens)
    messages = [Message("system", (system_prompt.strip(),))] if system_prompt.strip() else []
    for turn in turns:
        if turn.role == "assistant":
            messages.append(Message("assistant", (clean_text(turn.text, specials),)))
        else:
            speaker = clean_name(turn.author.name, specials) if shared and turn.author is not None else ""
            parts = tuple(without_special_tokens(part, specials) if isinstance(part, str) else part for part in turn.parts)
            messages.append(Message("user", parts, speaker))
    return Chat(tuple(messages))


class PromptTooLong(Exception):
    """Even the newest message alone does not fit; the message says so to the person who wrote it."""

    @classmethod
    def tokens(cls, tokens: int, budget: int) -> PromptTooLong:
        return cls(f"Your message is too long for me: it takes about {tokens} tokens and I can read about {budget}. Please shorten it.")


async def check_fits(chat: Chat, count_tokens: Callable[[Chat], Awaitable[int]], *, context_tokens: int, reserve_tokens: int) -> int:
    """The token count of a prompt that can't be shortened (a task's), or `PromptTooLong` if it
    leaves less than `reserve_tokens` of the context for the reply."""
    tokens = await count_tokens(chat)
    if tokens > context_tokens - reserve_tokens:
        raise PromptTooLong.tokens(tokens, context_tokens - reserve_tokens)
    return tokens


@dataclass(frozen=True)
class FittedPrompt:
    chat: Chat
    dropped: int  # oldest turns left out
    tokens: int


async def fit(
    turns: Sequence[Turn],
    count_tokens: Callable[[Chat], Awaitable[int]],
    *,
    context_tokens: int,
    reserve_tokens: int,
    max_images: int,
    system_prompt: str = "",
    shared: bool = False,
    sendable: Callable[[Chat], Awaitable[bool]] | None = None,
    special_tokens: Iterable[str] = (),
) -> FittedPrompt:
    """The chat of the longest suffix of `turns` that starts at a user turn and fits: at most
    `context_tokens - reserve_tokens` tokens (the reserve is for the reply), `max_images` images,
    and, if given, what `sendable` accepts (a remote model's limit on the size of a request).
    Oldest turns go first."""
    budget = context_tokens - reserve_tokens
    starts = [i for i, turn in enumerate(turns) if turn.role == "user"]
    if not starts:
        raise ValueError("a prompt needs at least one user turn")
    images_from = [sum(len(turn.images) for turn in turns[i:]) for i in starts]
    candidates = [i for i, images in zip(starts, images_from) if images <= max_images]
    if not candidates:
        raise PromptTooLong(
            f"Your message has {len(turns[starts[-1]].images)} images; I can look at {max_images} at most. "
            "Please send fewer."
        )

    async def measure(start: int) -> tuple[Chat, int, bool]:
        chat = chat_of(turns[start:], system_prompt, shared, special_tokens)
        tokens = await count_tokens(chat)
        return chat, tokens, tokens <= budget and (sendable is None or await sendable(chat))

    # Dropping more turns never makes the prompt longer or larger, so the first fitting start can be bisected.
    low, high = 0, len(candidates) - 1
    chat, tokens, fits = await measure(candidates[high])
    if tokens > budget:
        newest = turns[candidates[high] :]
        images = sum(len(turn.images) for turn in newest)
        if images:  # images can cost many tokens each (Idefics3's tiles): say if they are what is too much
            words = [Turn(turn.role, tuple(part for part in turn.parts if isinstance(part, str)), turn.author) for turn in newest]
            text_tokens = await count_tokens(chat_of(words, system_prompt, shared, special_tokens))
            if text_tokens <= budget:
                raise PromptTooLong(
                    f"Your {images} image{'s' if images > 1 else ''} take about {tokens - text_tokens} tokens, and with your text "
                    f"I can read about {budget}. Please send fewer images at a time."
                )
        raise PromptTooLong.tokens(tokens, budget)
    if not fits:
        raise PromptTooLong("Your images are more than the model server takes in one request. Please send fewer at a time.")
    best = (candidates[high], chat, tokens)
    while low < high:
        middle = (low + high) // 2
        chat, tokens, fits = await measure(candidates[middle])
        if fits:
            best, high = (candidates[middle], chat, tokens), middle
        else:
            low = middle + 1
    start, chat, tokens = best
    return FittedPrompt(chat=chat, dropped=start, tokens=tokens)
