"""The load scenario of tests/test_load.py as a benchmark: conversations on the fake Discord and the
fake Slack at once (all on 127.0.0.1), answered by one bot process on the tiny checkpoint. Prints the
throughput, the latency from sending a message to its answer showing (p50, p99) and the batch sizes
the model service ran. Exits with 1 if any message went unanswered, was answered twice or out of
order, or lost its turn in the store.

    python benchmarks/load.py [--conversations 60] [--messages 5] [--max-batch-size 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.tiny import write_tiny_checkpoint
from tests.load import run_load


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60, help="half on Discord, half on Slack")
    parser.add_argument("--messages", type=int, default=5, help="per conversation")
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_tiny_checkpoint(Path(directory) / "tiny")
        result = await run_load(
            checkpoint, Path(directory) / "run", conversations=args.conversations, messages=args.messages, max_batch_size=args.max_batch_size
        )
    print(result.report())
    problems = result.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
