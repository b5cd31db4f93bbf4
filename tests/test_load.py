"""Load: 300 messages in 60 conversations, on the fake Discord and the fake Slack at once, through one
bot process on the tiny checkpoint (the scenario is tests/load.py; benchmarks/load.py reports its
figures). Every message is answered exactly once, in its own thread, in order within its
conversation; every turn is stored; memory stays bounded."""

from __future__ import annotations

import logging

from tests.load import run_load

# The measured round (after a warm-up round) adds about 25 MB here, half of it the fakes' copies of
# the photos; keeping each message's image (about 200 KB decoded) would add 60 MB more.
MEMORY_BOUND = 64 * 2**20


async def test_300_messages_in_60_conversations_on_both_platforms_at_once(tiny_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    result = await run_load(tiny_checkpoint, tmp_path / "load", conversations=60, messages=5)
    print(result.report())
    assert result.total == 300
    assert result.problems() == []
    # Nothing went wrong on the way, not even a batch of the model that had to be split and retried.
    assert [f"{r.name}: {r.getMessage()}" for r in caplog.records] == []
    assert max(result.batch_sizes) > 1  # the two platforms shared one model service, which batched them
    assert result.rss_growth < MEMORY_BOUND
