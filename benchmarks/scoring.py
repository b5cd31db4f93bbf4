"""The worker-side time of one 10-label scoring (mixed_load's classification prompt) on the tiny checkpoint of each family.

A scoring is processed (the template, every label's tokens, the image processor: `process_scoring`),
then weighed (the vision encoder and one forward: `score_processed`). While others decode, the prompt
process does the first part beside the batch, and the batch pauses for the second alone; a scoring
that comes alone has the worker do both. Both parts are timed on the model's worker through
`LocalBackend.call_between_steps` (not the queue or the event loop). Prints the medians of --repeats
runs, after one warm-up, per family.

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
from model.scoring import process_scoring, score_processed
from model.tiny import FAMILIES, write_tiny_checkpoint


async def worker_times(service: LocalBackend, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `repeats` scorings of one classification on the worker: processing it, and
    weighing it (the batch's pause when the prompt process did the processing)."""
    request = classify_request(0)
    family = service.family

    def weigh(model, processor) -> tuple[float, float]:
        started = time.perf_counter()
        processed = process_scoring(family, request.prompt, request.continuations, family.image_cache)
        weighed = time.perf_counter()
        score_processed(model, family, processed, end_ids=family.end_ids, row_processors=service.row_processors)
        return weighed - started, time.perf_counter() - weighed

    await service.call_between_steps(weigh)  # warm-up
    times = [await service.call_between_steps(weigh) for _ in range(repeats)]
    return [processing for processing, _ in times], [weighing for _, weighing in times]


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
                processing, weighing = await worker_times(service, args.repeats)
            finally:
                await service.close()
        whole = [first + second for first, second in zip(processing, weighing)]
        print(
            f"tiny {family}: one 10-label scoring, median {statistics.median(whole) * 1000:.1f} ms on the worker alone; "
            f"beside others, the batch pauses {statistics.median(weighing) * 1000:.1f} ms (vision encoder and forward; max "
            f"{max(weighing) * 1000:.1f}) while the prompt process does the other {statistics.median(processing) * 1000:.1f} ms "
            f"(template, tokens, image processor); over {args.repeats}, image cache off, torch threads {args.threads or 'default'}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
