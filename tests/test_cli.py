"""The `idefics-bot` command, run as a person would run it (a subprocess, in an empty directory)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import BOTH_FAMILIES, image_bytes

COMMAND = [sys.executable, "-m", "bot"]


def environment(env: dict | None = None) -> dict:
    """The command's environment: offline, and without any chat platform's secrets."""
    variables = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    for secret in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        variables.pop(secret, None)
    return variables


def idefics_bot(*args: str, cwd: Path, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300, env=environment(env))


@asynccontextmanager
async def web_chat_process(directory: Path, checkpoint: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[str]]]:
    """`idefics-bot run` in `directory` (with its config.toml) until it says where its web chat is:
    the process, the chat's address and the lines it said. Afterwards it is stopped with SIGTERM and
    must exit with 0, without a traceback."""
    bot = await asyncio.create_subprocess_exec(*COMMAND, "run", "--model", str(checkpoint), cwd=directory, env=environment(), stderr=asyncio.subprocess.PIPE)
    try:
        said: list[str] = []
        async with asyncio.timeout(120):
            while not (said and said[-1].startswith("Web chat: ")):
                line = await bot.stderr.readline()
                assert line, f"the bot ended before serving the page: {said}"
                said.append(line.decode().strip())
        yield bot, said[-1].removeprefix("Web chat: "), said
        bot.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await bot.wait() == 0
        assert "Traceback" not in (await bot.stderr.read()).decode()
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


def test_tiny_checkpoint_then_ask_prints_a_reply(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(image_bytes(size=(640, 480), kind="JPEG"))
    written = idefics_bot("tiny-checkpoint", "tiny", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    asked = idefics_bot("ask", "--model", "tiny", "--image", "photo.jpg", "What is in this image?", cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip()
    assert_no_traceback(asked)
    assert not (tmp_path / "state").exists()  # one-off questions leave no state behind


def test_ask_with_a_bad_image_says_why(tmp_path, tiny_checkpoint):
    (tmp_path / "scan.png").write_bytes(b"%PDF-1.5 not an image")
    result = idefics_bot("ask", "--model", str(tiny_checkpoint), "--image", "scan.png", "What?", cwd=tmp_path)
    assert result.returncode == 1
    assert "scan.png is a PDF document, not an image" in result.stderr
    missing = idefics_bot("ask", "--model", str(tiny_checkpoint), "--image", "nowhere.png", "What?", cwd=tmp_path)
    assert missing.returncode == 1 and "nowhere.png can't be read: No such file or directory" in missing.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize(
    "model, message",
    [
        ("HuggingFaceM4/idefics-9b-instruct", "not in the local Hugging Face cache and the hub cannot be reached"),
        ("./no-such-dir", "The model directory ./no-such-dir does not exist"),
    ],
)
def test_a_checkpoint_that_cannot_be_had_is_one_paragraph(tmp_path, model, message):
    result = idefics_bot("ask", "--model", model, "hello", cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "idefics-bot tiny-checkpoint" in result.stderr
    assert_no_traceback(result)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = idefics_bot("ask", "--model", "bert", "hello", cwd=tmp_path)
    assert result.returncode == 1 and "is a 'bert' model, which the bot can't serve: idefics-bot serves IDEFICS v1" in result.stderr
    assert "Idefics3 and SmolVLM" in result.stderr


def test_run_without_any_platform_says_what_to_configure(tmp_path):
    (tmp_path / "config.toml").write_text("[web]\nenabled = false\n")
    result = idefics_bot("run", cwd=tmp_path)
    assert result.returncode == 1
    # The default checkpoint on a machine without a GPU: the first line says so, and what to run instead.
    first = result.stderr.splitlines()[0]
    assert first.startswith("No GPU here: HuggingFaceM4/idefics-9b-instruct") and "idefics-bot run --model HuggingFaceTB/SmolVLM-256M-Instruct" in first
    for needed in ("[web] enabled", "DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "idefics-bot chat", "tiny-checkpoint"):
        assert needed in result.stderr
    assert_no_traceback(result)


async def test_run_with_nothing_configured_serves_the_web_chat_and_says_how_to_add_platforms(tmp_path, tiny_checkpoint):
    (tmp_path / "config.toml").write_text("[web]\nport = 0\n")  # the default port 8080 may be taken on a test machine
    async with web_chat_process(tmp_path, tiny_checkpoint) as (_, url, said):
        assert url.startswith("http://127.0.0.1:")
        assert "DISCORD_TOKEN" in "\n".join(said) and "SLACK_BOT_TOKEN" in "\n".join(said)
        async with aiohttp.ClientSession() as client, client.get(url) as page:
            assert page.status == 200 and "<title>IDEFICS</title>" in await page.text()


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "config.toml").write_text('[model]\nquantization = "3bit"\n[discord]\nenabled = true\n')
    result = idefics_bot("run", cwd=tmp_path)
    assert result.returncode == 2
    assert "config.toml: [model] quantization: Input should be 'none', '8bit' or '4bit' (got '3bit')" in result.stderr
    assert "[discord] is enabled but has no token" in result.stderr or "quantization" in result.stderr
    assert_no_traceback(result)


def test_render_prints_the_exact_model_input(tmp_path):
    conversation = {
        "system_prompt": "",
        "turns": [
            {"role": "user", "parts": ["What is in this image?", {"image": "idefix.png"}]},
            {"role": "assistant", "text": "This picture depicts Idefix, the dog of Obelix in Asterix and Obelix. Idefix is running on the ground."},
            {"role": "user", "parts": [{"image": "obelix.png"}, "And who is that?<image>"]},
        ],
    }
    (tmp_path / "idefix.json").write_text(json.dumps(conversation))
    result = idefics_bot("render", "--conversation", "idefix.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        '"User: What is in this image?"',
        "<image idefix.png>",
        '"<end_of_utterance>"',
        '"\\nAssistant: This picture depicts Idefix, the dog of Obelix in Asterix and Obelix. Idefix is running on the ground.<end_of_utterance>"',
        '"\\nUser:"',
        "<image obelix.png>",
        '"And who is that?<end_of_utterance>"',
        '"\\nAssistant:"',
    ]
    (tmp_path / "bad.json").write_text('{"turns": [{"role": "robot"}]}')
    bad = idefics_bot("render", "--conversation", "bad.json", cwd=tmp_path)
    assert bad.returncode == 1 and 'bad.json: turn 1: needs "role": "user" or "assistant".' in bad.stderr


@BOTH_FAMILIES
def test_terminal_chat_streams_and_remembers(tmp_path, tiny_checkpoint):
    (tmp_path / "red.png").write_bytes(image_bytes())
    script = "/image red.png\nWhat is this?\n/image missing.png\nand this?\n/reset\n/quit\n"
    result = idefics_bot("chat", "--model", str(tiny_checkpoint), cwd=tmp_path, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "(Attached red.png; it goes with your next message.)" in result.stdout
    assert result.stdout.count("bot> ") == 2
    assert "(missing.png can't be read: No such file or directory.)" in result.stdout
    assert "(Forgot this conversation: 2 turns.)" in result.stdout
    assert_no_traceback(result)


def test_files_that_are_not_regular_files_are_refused_without_reading_them(tmp_path, tiny_checkpoint):
    """A FIFO would block forever and /dev/zero never ends: both are named and refused at once."""
    os.mkfifo(tmp_path / "conversation.json")
    os.mkfifo(tmp_path / "photo.png")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "config.toml")
    cases = [
        (("render", "--conversation", "conversation.json"), "conversation.json is a named pipe (FIFO), not a regular file."),
        (("ask", "--model", str(tiny_checkpoint), "--image", "photo.png", "What?"), "photo.png is a named pipe (FIFO)"),
        (("ask", "--model", str(tiny_checkpoint), "--image", "/dev/zero", "What?"), "/dev/zero is a character device"),
        (("render", "--config", "fifo/config.toml", "--conversation", "x.json"), "config.toml is a named pipe (FIFO), not a regular file."),
        (("render", "--conversation", str(tmp_path)), "is a directory, not a regular file."),
    ]
    for args, message in cases:
        result = idefics_bot(*args, cwd=tmp_path)
        assert result.returncode in (1, 2) and message in result.stderr, (args, result.stderr)
        assert_no_traceback(result)


def test_a_bad_conversation_file_is_reported_in_one_line(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "broken.json").write_text('{"turns": [')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "huge.json").write_bytes(b" " * (17 * 1024 * 1024))
    expected = {
        "deep.json": "deep.json is not a conversation: its JSON is nested too deeply.",
        "broken.json": "broken.json is not valid JSON: Expecting value: line 1 column 12 (char 11).",
        "binary.json": "binary.json is not valid JSON: 'utf-8' codec can't decode byte 0xff",
        "huge.json": "huge.json is 17.0 MB; a conversation file may have 16 MB.",
    }
    for name, message in expected.items():
        result = idefics_bot("render", "--conversation", name, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_start_up_problems_are_one_paragraph(tmp_path, tiny_checkpoint):
    """What an admin gets wrong before the bot runs ends in one paragraph that says what to do."""
    truncated = shutil.copytree(tiny_checkpoint, tmp_path / "truncated")
    os.truncate(truncated / "model.safetensors", (truncated / "model.safetensors").stat().st_size // 2)
    no_tokenizer = shutil.copytree(tiny_checkpoint, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    cases = [
        (
            ("ask", "--model", "truncated", "hi"),
            {},
            "Loading truncated (dtype float32, quantization none, device_map cpu) failed: Error while deserializing header",
        ),
        (
            ("ask", "--model", "no-tokenizer", "hi"),
            {},
            "The tokenizer of no-tokenizer doesn't know the IDEFICS tokens <fake_token_around_image>, <image>, <end_of_utterance>",
        ),
        (
            ("ask", "--model", str(tiny_checkpoint), "hi"),
            {"DATABASE_URL": "postgresql://idefics:s3cret@[::1/idefics"},
            "[state]: url (or DATABASE_URL) can't be parsed as a URL",
        ),
    ]
    for args, env, message in cases:
        result = idefics_bot(*args, cwd=tmp_path, env=env)
        assert result.returncode in (1, 2) and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "s3cret" not in result.stderr, result.stderr
        assert_no_traceback(result)


def test_a_health_port_in_use_is_one_paragraph(tmp_path, tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "config.toml").write_text(
            f'[model]\ncheckpoint = "{tiny_checkpoint}"\n[discord]\ntoken = "not-used"\n'
            f'[health]\nenabled = true\nport = {port}\n[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
        )
        result = idefics_bot("run", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"The health endpoint can't listen on 127.0.0.1:{port} (" in result.stderr and "[health] port" in result.stderr
    assert_no_traceback(result)
