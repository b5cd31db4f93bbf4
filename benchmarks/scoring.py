"""The worker-side time of one 10-label scoring (mixed_load's classification prompt) on the tiny checkpoint of each family.

A scoring is processed (the template, every label's tokens, the image processor: `process_scoring`),
its image encoded (the vision encoder and what follows it: `Family.encode_images`), then weighed
(one forward: `score_processed`). While others decode, the prompt process does the processing
beside the batch, and the encoding too where the model runs on the CPU with a core to spare; the
batch pauses for the rest. A scoring that comes alone has the worker do all of it. The three parts are
timed on the model's worker through `LocalBackend.call_between_steps` (not the queue or the event
loop). Prints the medians of --repeats runs, after one warm-up, per family.

    python benchmarks/scoring.py [--threads 1] [--repeats 20] [--family idefics3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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


async def worker_times(service: LocalBackend, repeats: int) -> list[tuple[float, float, float]]:
    """Seconds of each of `repeats` scorings of one classification on the worker: processing it,
    encoding its image, and weighing it."""
    request = classify_request(0)
    family = service.family

    def weigh(model, processor) -> tuple[float, float, float]:
        started = time.perf_counter()
        processed = process_scoring(family, request.prompt, request.continuations, family.image_cache)
        processed_at = time.perf_counter()
        states = tuple(family.encode_images(family.vision(model), processed.prompt))
        encoded = dataclasses.replace(processed, prompt=dataclasses.replace(processed.prompt, pixels={}, states=states))
        encoded_at = time.perf_counter()
        score_processed(model, family, encoded, end_ids=family.end_ids, row_processors=service.row_processors)
        return processed_at - started, encoded_at - processed_at, time.perf_counter() - encoded_at

    await service.call_between_steps(weigh)  # warm-up
    return [await service.call_between_steps(weigh) for _ in range(repeats)]


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} ms"


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
                times = await worker_times(service, args.repeats)
            finally:
                await service.close()
        print(
            f"tiny {family}: one 10-label scoring, median {ms([sum(run) for run in times])} on the worker alone; beside others, "
            f"the batch pauses {ms([encoding + forward for _, encoding, forward in times])} (vision encoder and forward) while the "
            f"prompt process does the other {ms([processing for processing, _, _ in times])} (template, tokens, image processor), "
            f"or, on a CPU with a core to spare, {ms([forward for _, _, forward in times])} (the forward) while the prompt process "
            f"does {ms([processing + encoding for processing, encoding, _ in times])}; "
            f"over {args.repeats}, image cache off, torch threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
