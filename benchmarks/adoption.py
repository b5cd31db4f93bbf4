"""How long questions wait when a process dies: the scenario of tests/test_adoption.py with the
default [bot] adopt_after_s (or --adopt-after-s). Two real `idefics-bot run` processes on a throwaway
PostgreSQL server (Debian's postgresql package, as for the tests), Slack and the model faked on
127.0.0.1; one is killed in the middle of two replies. Prints the seconds from the kill until the
other had answered both; exits with 1 if anything was answered twice or not in place.

    python benchmarks/adoption.py [--adopt-after-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import BotConfig
from tests.adoption import run_adoption
from tests.postgres import PostgresServer


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adopt-after-s", type=float, default=BotConfig().adopt_after_s)
    args = parser.parse_args()
    server = PostgresServer()
    server.start()
    try:
        database = f"adoption_{secrets.token_hex(4)}"
        server.sql(f'CREATE DATABASE "{database}"')
        with tempfile.TemporaryDirectory() as directory:
            adoption = await run_adoption(Path(directory), server.url(database), args.adopt_after_s)
    finally:
        server.stop()
    print(f"adopt_after_s = {args.adopt_after_s:g}: both stranded questions answered {adoption.delay:.1f} s after the kill")
    print(f"ratio to adopt_after_s: {adoption.delay / args.adopt_after_s:.2f}")
    whole = all(len(answers) == 1 and answers[0][0] == adoption.begun[question][0] for question, answers in adoption.answers.items())
    problems = [] if whole and adoption.found_on_return == [0] and not adoption.errors else ["answered twice, out of place, or with errors"]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
