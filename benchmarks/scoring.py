"""The worker-side time of one 10-label scoring (mixed_load's classification prompt) on the tiny checkpoint of each family.

`score_continuations` runs on the model's worker through `LocalBackend.call_between_steps`, timed
there (not the queue or the event loop): the pause a scoring puts into the running batch. Prints the
median of --repeats runs, after one warm-up, per family, and that of the preparation alone
(tokenizing and the vision encoder), the part no change to the forward touches.

    python benchmarks/scoring.py [--threads 1] [--repeats 20] [--family idefics3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixed_load import classify_request

from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.scoring import continuation_ids, score_continuations
from model.tiny import FAMILIES, write_tiny_checkpoint


async def worker_times(service: LocalBackend, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `repeats` scorings of one classification, measured on the worker, and of
    its preparation alone (`continuation_ids`: tokenizing, the vision encoder), which every way of
    running the forward shares."""
    request = classify_request(0)

    def weigh(model, processor) -> tuple[float, float]:
        started = time.perf_counter()
        continuation_ids(model, service.family, request.prompt, request.continuations)
        prepared = time.perf_counter()
        score_continuations(model, service.family, request.prompt, request.continuations, end_ids=service.family.end_ids, row_processors=service.row_processors)
        return time.perf_counter() - prepared, prepared - started

    await service.call_between_steps(weigh)  # warm-up
    times = [await service.call_between_steps(weigh) for _ in range(repeats)]
    return [whole for whole, _ in times], [preparing for _, preparing in times]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--family", choices=FAMILIES, action="append", help="only this family (repeatable; default: all)")
    args = parser.parse_args()
    for family in args.family or FAMILIES:
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = write_tiny_checkpoint(directory, family=family)
            # The image cache off: each run classifies the same image, and the pause that matters is a new photo's.
            service = await LocalBackend.open(CheckpointSettings(str(checkpoint)), BatchSettings(threads=args.threads or None, image_cache_bytes=0))
            try:
                times, preparing = await worker_times(service, args.repeats)
            finally:
                await service.close()
        print(
            f"tiny {family}: one 10-label scoring, median {statistics.median(times) * 1000:.1f} ms "
            f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; preparing alone {statistics.median(preparing) * 1000:.1f}) "
            f"over {args.repeats}, image cache off, torch threads {args.threads or 'default'}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
