"""Which part of a reply's decoded text may be shown, by the same rule on every backend (so that
the streamed deltas of a reply add up to its final text). Free of torch, for remote backends."""

from __future__ import annotations

from collections.abc import Sequence

from model.service import USER_TURN_STOP

# The reference demo hides a trailing "\nUser" (the model opening the next turn without the colon).
_TRAILING_USER = USER_TURN_STOP.rstrip(":")


def visible_text(text: str, stop_strings: Sequence[str], final: bool) -> tuple[str, bool]:
    """What of the decoded `text` may be shown, and whether a stop string ended it.

    While the row runs, anything that might still turn into a stop string and trailing blanks are
    held back, so the shown text only ever grows.
    """
    stopped = False
    for stop in stop_strings:
        at = text.find(stop)
        if at != -1:
            text, stopped = text[:at], True
    if final or stopped:
        text = text.rstrip()
        if text.endswith(_TRAILING_USER):
            text = text[: -len(_TRAILING_USER)]
        return text.strip(), stopped
    held = max((n for stop in (*stop_strings, _TRAILING_USER) for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
    text = text[: len(text) - held].rstrip()
    return text.lstrip(), False
