"""Whether this workspace streams replies natively (`chat.startStream`), decided once for every process.

Slack's errors for `chat.startStream` are of two kinds. A few say the method itself is not there for
this app in this workspace (`WORKSPACE_REFUSALS`: the method unknown or not available, deprecated,
not for this token or this Enterprise, a scope missing): that holds for every reply, so it is kept
in the shared store, where every process of the bot reads it, and replies use the fallback (an
edited placeholder) from then on. The decision is asked again after `RECHECK_S`, as a workspace may
turn the feature on later. Every other refusal is about one channel or thread (`not_in_channel`,
`is_archived`, `channel_type_not_supported`, a locked thread, a read-only channel, `ekm_access_denied`)
or a passing limit (`ratelimited`, `message_limit_exceeded`): that reply falls back, and the next
one streams again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)

# chat.startStream's documented errors that refuse the method for the whole workspace.
WORKSPACE_REFUSALS = frozenset(
    {"unknown_method", "method_deprecated", "deprecated_endpoint", "not_allowed_token_type", "enterprise_is_restricted", "missing_scope"}
)
RECHECK_S = 24 * 3600.0
SETTING = "native_streaming.refused"  # the stored decision: {"error": ..., "at": epoch seconds}


class Values(Protocol):
    """The values an adapter keeps in the shared store (`Platform.get_value` / `set_value`)."""

    async def get_value(self, name: str) -> str | None: ...

    async def set_value(self, name: str, value: str) -> None: ...


class StreamingChoice:
    """Whether to try a native stream for the next reply; told of each refusal and each stream that started."""

    def __init__(self, values: Values, *, enabled: bool):
        self.values = values
        self.enabled = enabled  # [slack] native_streaming
        self._refused_at: float | None = None  # when this workspace refused the method, as far as we know
        self._confirmed = False  # a stream has started here (logged once)

    async def allowed(self) -> bool:
        """Whether the workspace may stream: on in the config, and not refused (by this process or another)
        within `RECHECK_S`."""
        if not self.enabled:
            return False
        if self._may_stream():
            self._refused_at = _refused_at(await self.values.get_value(SETTING))
        return self._may_stream()

    def _may_stream(self) -> bool:
        """Not refused as far as this process knows, or refused `RECHECK_S` ago or more."""
        return self._refused_at is None or time.time() - self._refused_at >= RECHECK_S

    async def refused(self, error: str) -> None:
        """Slack refused a stream with `error`: for the workspace (kept for every process), or for this reply only."""
        if error not in WORKSPACE_REFUSALS:
            log.info("slack.stream_refused", extra={"error": error, "fallback": "this reply"})
            return
        self._refused_at = time.time()
        await self.values.set_value(SETTING, json.dumps({"error": error, "at": self._refused_at}))
        log.warning("slack.streaming_unavailable", extra={"error": error, "fallback": "placeholder + chat.update"})

    def started(self) -> None:
        """A stream started: the workspace allows them."""
        if not self._confirmed:
            self._confirmed = True
            log.info("slack.streaming", extra={"native": True})


def _refused_at(stored: str | None) -> float | None:
    """When the stored decision says the workspace refused streams (None: it didn't, or it can't be read)."""
    try:
        at = json.loads(stored)["at"] if stored else None
    except (ValueError, TypeError, KeyError):
        return None
    return float(at) if isinstance(at, (int, float)) else None
