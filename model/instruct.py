"""Prompt formats written without a processor. IDEFICS v1's instruct format: a `Chat` as the flat list
of text items and images the model was trained on, item for item as its documentation writes it (the
local v1 backend and TGI send this); and, for TGI, the chat format of Idefics2/3 and SmolVLM.

    User: What is in this image?  <image>  <end_of_utterance>
    \\nAssistant: A dog running.<end_of_utterance>
    \\nUser:  <image>  And who is that?<end_of_utterance>
    \\nAssistant:

The text of messages is expected clean (the bot removes special tokens and forged turns from what
people typed and from stored replies before building a Chat).
"""

from __future__ import annotations

from model.service import END_OF_UTTERANCE, Chat, Part


def render_instruct(chat: Chat) -> list[Part]:
    """The instruct-format items for `chat`, ending with the cue for the assistant's next reply; a
    chat with a `guide` prompt is that prompt, verbatim. In shared conversations each user turn
    starts with the speaker's name in brackets, so the model can tell people apart."""
    if chat.guide:
        return list(chat.guide)
    items: list[Part] = []
    for message in chat.messages:
        newline = "\n" if items else ""
        if message.role == "system":
            if message.text.strip():
                items.append(message.text.strip())
            continue
        if message.role == "assistant":
            items.append(f"{newline}Assistant: {message.text}{END_OF_UTTERANCE}")
            continue
        label = f"{newline}User:"
        if message.speaker:
            label += f" [{message.speaker}]"
        text = label
        for part in message.parts:
            if not isinstance(part, str):
                if text:
                    items.append(text)
                items.append(part)
                text = ""
            elif part.strip():
                text = f"{text} {part.strip()}" if text else part.strip()
        items.append(text + END_OF_UTTERANCE)
    cue = f"{chr(10) if items else ''}Assistant:"
    items.append(f"{cue} {chat.reply_start}" if chat.reply_start else cue)
    return items


# The chat format of Idefics2, Idefics3 and SmolVLM, as their chat templates write it, for a server
# that takes the prompt as text (TGI): each checkpoint's template differs only in what it starts with.
CHAT_FORMAT_STARTS = {"smolvlm": "<|im_start|>", "idefics3": "<|begin_of_text|>", "idefics2": ""}


def render_chat_format(chat: Chat, start: str) -> list[Part]:
    """`chat` in the Idefics2/3 chat format ("User: ...<end_of_utterance>\\nAssistant:"), text and
    images in order, after `start` (see CHAT_FORMAT_STARTS); a local model renders with its own
    template instead (model/idefics3.py)."""
    items: list[Part] = [start]
    for message in chat.messages:
        parts: list[Part] = []
        for part in message.parts:
            if not isinstance(part, str):
                parts.append(part)
            elif part.strip():
                parts.append(f"{parts.pop()} {part.strip()}" if parts and isinstance(parts[-1], str) else part.strip())
        if message.speaker and parts and isinstance(parts[0], str):
            parts[0] = f"[{message.speaker}] {parts[0]}"
        elif message.speaker:
            parts.insert(0, f"[{message.speaker}]")
        role = message.role.capitalize() + (": " if parts and isinstance(parts[0], str) else ":")
        items += [role, *parts, f"{END_OF_UTTERANCE}\n"]
    items.append(f"Assistant: {chat.reply_start.lstrip(' ')}" if chat.reply_start else "Assistant:")
    merged: list[Part] = []
    for item in items:  # adjacent text becomes one item
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return [item for item in merged if item != ""]
