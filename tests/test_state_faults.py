"""The state on a file system that refuses writes: read-only, the wrong permissions, a missing
directory. Each is named as what it is, never as a damaged database to be moved aside."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
from pathlib import Path

from bot.state.store import SQLiteStore
from ground.conversation import Author, ConversationKey, Turn
from tests.bots import Harness, logged, running
from tests.fake_slack import FakeSlack
from tests.filesystems import WITHOUT_ROOT_OVERRIDES, remount_read_only, tmpfs
from tests.test_cli import COMMAND, assert_no_traceback, environment
from tests.test_slack import slack_config


def make_state(path: Path) -> None:
    async def write() -> None:
        store = await SQLiteStore.open(path)
        await store.add_turn(ConversationKey("test", "c1"), Turn("user", ("hello",), Author("u1", "Ann")))
        await store.close()

    asyncio.run(write())


def chat(tmp_path: Path, state: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`idefics-bot chat` on `state`: the store opens first, before any model is loaded."""
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\npath = "{state}"\n')
    config.chmod(0o644)
    result = subprocess.run(
        [*prefix, *COMMAND, "chat", "--config", str(config)],
        check=False,
        cwd=tmp_path,
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
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


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its file system has no room left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while file.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


async def test_a_full_disk_is_told_to_each_asker_and_the_bot_keeps_serving(tmp_path, tiny_checkpoint, tap):
    """Slack, through its HTTP path: while the state's disk is full, each asker is told that the
    conversation can't be saved (one ERROR line each, no traceback); once there is room, answers resume."""
    with tmpfs(tmp_path / "disk", "2m") as disk, logged("adapters") as logs, logged("bot") as core:
        async with FakeSlack() as slack:
            config = slack_config(tmp_path, tiny_checkpoint, slack)
            config = config.model_copy(update={"state": config.state.model_copy(update={"path": disk / "bot.sqlite3"})})
            async with running(config, logs, tap):
                harness = Harness(slack, config, logs, tap)
                (answered,) = await harness.answer(slack.mention("C1", "U1", "first, with room on the disk"))
                assert answered.text and "couldn't save" not in answered.text
                filler = fill(disk)
                askers = [slack.mention(f"C{n}", f"U{n}", "hello?") for n in (2, 3, 4)]
                for mention in askers:
                    (reply,) = await harness.answer(mention)
                    assert "I couldn't save this conversation right now" in reply.text, reply.text
                filler.unlink()
                (again,) = await harness.answer(slack.mention("C5", "U5", "and now?"))
                assert again.text and "couldn't save" not in again.text
        errors = [r for r in [*core.items, *logs.items] if r.levelno >= logging.ERROR]
        assert [(r.msg, r.conversation) for r in errors] == [("state.unavailable", f"slack:C{n}:{m['ts']}") for n, m in zip((2, 3, 4), askers)]
        assert all(r.exc_info is None and "database or disk is full" in r.error for r in errors), errors
