"""The running batch's per-step cost on the tiny checkpoint (fp32): the median CPU time of a decode
forward and of `Batch.choose` (the host work that picks each row's token) for a plain greedy row
alone, beside a 2-beam search, and beside a sampled row. Issue #24's case D pays the beam rows'
share of it at every step of the six short replies.

    python benchmarks/batch_steps.py [--family idefics3] [--threads 1] [--steps 200] [--profile beams]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from fixed_length import NoEarlyEnd, image

from model.batch import Batch, Row, Sampling
from model.beams import BeamSearch
from model.families import family_for
from model.loading import CheckpointSettings, load_checkpoint
from model.service import Chat, Message
from model.tiny import FAMILIES, write_tiny_checkpoint

STORY = Chat((Message("user", ("Instruction: Use the image to write a story. \n", image(200), "Story: \n")),))
PLAIN = Chat((Message("user", ("Tell me about picture number 101.", image(101))),))


def rows_of(case: str, model, family, steps: int, no_end: NoEarlyEnd) -> list[Row]:
    """A plain greedy row, and beside it a 2-beam search ("beams") or a seeded sampled row ("sampled")."""
    plain = family.prepare(model, PLAIN)
    rows = [Row("plain", plain, steps + 1, processors=[no_end])]
    if case == "beams":
        prompt = family.prepare(model, STORY)
        search = BeamSearch(prompt.ids, 2, steps + 1, end_ids=sorted(family.end_ids), banned_ids=family.banned_ids, processors=[no_end])
        search.rows = [Row("story", prompt, steps + 1, beams=search) for _ in range(2)]
        rows += search.rows
    elif case == "sampled":
        rows.append(Row("sampled", plain, steps + 1, Sampling(do_sample=True, temperature=0.8, top_p=0.9, seed=3), [no_end]))
    return rows


def timed_steps(model, family, case: str, steps: int, profile: cProfile.Profile | None) -> tuple[list[float], list[float]]:
    """CPU seconds of this thread (so that other processes' load counts less) in each decode forward
    and each `choose`, over `steps` steps."""
    no_end = NoEarlyEnd(sorted(family.end_ids))
    banned = family.banned_ids
    batch = Batch.prefill(model, rows_of(case, model, family, steps, no_end), family, family.tokenizer.pad_token_id)
    batch.choose(banned)
    forwards, choices = [], []
    for _ in range(steps):
        started = time.thread_time()
        batch.decode(model)
        decoded = time.thread_time()
        if profile is not None:
            profile.enable()
        batch.choose(banned)
        if profile is not None:
            profile.disable()
        forwards.append(decoded - started)
        choices.append(time.thread_time() - decoded)
    return forwards, choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="idefics")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own choice)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case; the figures are medians over all their steps")
    parser.add_argument("--profile", choices=("plain", "beams", "sampled"), help="print cProfile's top functions of `choose` in this case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        model, processor = load_checkpoint(CheckpointSettings(str(write_tiny_checkpoint(directory, family=args.family)), dtype="float32"))
        family = family_for(processor, model.config)
        print(
            f"tiny {args.family}, fp32, torch threads {torch.get_num_threads()}, {args.steps} steps x {args.rounds} rounds, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for case in ("plain", "beams", "sampled"):
            profile = cProfile.Profile() if args.profile == case else None
            forwards, choices = [], []
            for _ in range(args.rounds):
                forward, choice = timed_steps(model, family, case, args.steps, profile)
                forwards += forward
                choices += choice
            print(
                f"{case:>8}: decode {statistics.median(forwards) * 1e3:.3f} ms, choose {statistics.median(choices) * 1e3:.3f} ms "
                f"(p90 {sorted(choices)[int(0.9 * len(choices))] * 1e3:.3f} ms) per step",
                flush=True,
            )
            if profile is not None:
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
