"""The SQL of the stores' schemas, one file per database beside this module (sqlite.sql, postgres.sql):
migrations, applied in order and each once."""

from __future__ import annotations

import re
from pathlib import Path

_MIGRATION = re.compile(r"^-- migration (\d+)$", re.MULTILINE)


def migrations(database: str) -> list[str]:
    """The migrations of `database`'s schema (`<database>.sql`), oldest first: the SQL after each
    `-- migration N` line, numbered 1, 2, 3, ... in order."""
    text = Path(__file__).with_name(f"{database}.sql").read_text(encoding="utf-8")
    parts = _MIGRATION.split(text)
    numbers = [int(number) for number in parts[1::2]]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"{database}.sql: migrations numbered {numbers}, not 1, 2, 3, ...")
    return [body.strip() for body in parts[2::2]]
