"""The state on a file system that refuses writes: read-only, the wrong permissions, a missing
directory. Each is named as what it is, never as a damaged database to be moved aside."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from bot.core.conversation import Author, ConversationKey, Turn
from bot.state.store import SQLiteStore
from tests.filesystems import WITHOUT_ROOT_OVERRIDES, remount_read_only, tmpfs
from tests.test_cli import COMMAND, assert_no_traceback, environment


def make_state(path: Path) -> None:
    async def write() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.add_turn(ConversationKey("test", "c1"), Turn("user", ("hello",), Author("u1", "Ann")))
        await store.close()

    asyncio.run(write())


def chat(tmp_path: Path, state: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`idefics-bot chat` on `state`: the store opens first, before any model is loaded."""
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\npath = "{state}"\n')
    config.chmod(0o644)
    result = subprocess.run(
        [*prefix, *COMMAND, "chat", "--config", str(config)], check=False, cwd=tmp_path, input="", capture_output=True, text=True, timeout=120, env=environment()
    )
    assert result.returncode == 1 and "Move it aside" not in result.stderr, result.stderr
    assert_no_traceback(result)
    return result


def test_a_valid_state_on_a_read_only_mount_is_named_as_such(tmp_path):
    with tmpfs(tmp_path / "mount", "4m") as mount:
        make_state(mount / "bot.sqlite3")
        remount_read_only(mount)
        result = chat(tmp_path, mount / "bot.sqlite3")
        assert f"The state file {mount}/bot.sqlite3 can't be opened for writing: {mount} is on a read-only file system." in result.stderr
        missing = chat(tmp_path, mount / "new" / "bot.sqlite3")
        assert f"{mount} is on a read-only file system" in missing.stderr


def test_permissions_and_missing_directories_are_named(tmp_path):
    state = tmp_path / "state"
    make_state(state / "bot.sqlite3")
    (state / "bot.sqlite3").chmod(0o444)
    result = chat(tmp_path, state / "bot.sqlite3", tuple(WITHOUT_ROOT_OVERRIDES))
    assert "may not write the file (owner uid 0, mode -r--r--r--)" in result.stderr
    (state / "bot.sqlite3").chmod(0o644)
    state.chmod(0o555)
    try:
        in_directory = chat(tmp_path, state / "bot.sqlite3", tuple(WITHOUT_ROOT_OVERRIDES))
        assert f"may not write in its directory {state} (owner uid 0, mode dr-xr-xr-x)" in in_directory.stderr
        missing = chat(tmp_path, state / "new" / "bot.sqlite3", tuple(WITHOUT_ROOT_OVERRIDES))
        assert f"the directory {state}/new does not exist and can't be created in {state} (Permission denied)" in missing.stderr
    finally:
        state.chmod(0o755)
