"""Requests per second through the model service: 8 concurrent requests (batched) vs the same 8
one after another. Target: at least 3x on a 2-core CPU with the tiny checkpoint.

    python benchmarks/throughput.py [--requests 8] [--tokens 32] [--rounds 5]
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


from fixed_length import NoEarlyEnd, image

from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.service import Chat, GenerationParams, GenerationRequest, Message
from model.tiny import write_tiny_checkpoint


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_tiny_checkpoint(directory)
        # The image cache off: every round's images are encoded anew, in both modes.
        service = await LocalBackend.open(CheckpointSettings(str(checkpoint)), BatchSettings(max_batch_size=args.requests, image_cache_bytes=0))
        tokenizer = service._tokenizer
        no_end = NoEarlyEnd([tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id])
        service.row_processors.append(lambda prompt_ids: no_end)
        requests = [
            GenerationRequest(
                Chat((Message("user", (f"Describe picture number {n}.", image(n))),)),
                GenerationParams(max_new_tokens=args.tokens),
            )
            for n in range(args.requests)
        ]
        await service.generate(requests[0])  # warm-up

        sequential, concurrent = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for request in requests:
                await service.generate(request)
            sequential.append(time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.gather(*(service.generate(request) for request in requests))
            concurrent.append(time.perf_counter() - started)
        await service.close()

    one_by_one, batched = statistics.median(sequential), statistics.median(concurrent)
    print(f"{args.requests} requests x {args.tokens} tokens, tiny IDEFICS on {os.cpu_count()} CPU cores, median of {args.rounds} rounds")
    print(f"  one after another: {one_by_one:.3f} s  = {args.requests / one_by_one:7.1f} requests/s")
    print(f"  concurrent (a running batch of up to {max(service.batch_sizes)}): {batched:.3f} s  = {args.requests / batched:7.1f} requests/s")
    ratio = one_by_one / batched
    print(f"  speed-up: {ratio:.1f}x (target: at least 3x) {'OK' if ratio >= 3 else 'BELOW TARGET'}")


if __name__ == "__main__":
    asyncio.run(main())
