"""The web chat for tests: the bot started as `idefics-bot run` starts it (`run_bot`) with only the web
chat on a free port of 127.0.0.1, and a real headless Chromium (Debian's `chromium`, driven by
Playwright, never a browser of Playwright's own) to open it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from bot.runtime.config import Config
from tests.bots import BotRun, logged
from tests.conftest import write_config
from tests.fake_slack import Journal

CHROMIUM = Path("/usr/bin/chromium")
# As root the sandbox can't start; the rest keep Chromium from reaching for Google's services, which
# an offline machine can't reach (Playwright drives Debian's chromium here and downloads no browser).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "a-long-test-token-0123456789"


def web_config(tmp_path: Path, checkpoint: Path, *, max_new_tokens: int = 24, max_batch_size: int = 8, web: dict | None = None) -> Config:
    """Only the web chat (left to its defaults: on, since nothing else is), on any free port; `web`
    keys go into [web]."""
    web_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in {"port": 0, **(web or {})}.items())
    return write_config(
        tmp_path / "web.toml",
        f"""
[bot]
shutdown_grace_s = 10.0
[model]
checkpoint = "{checkpoint}"
max_batch_size = {max_batch_size}
[generation]
max_new_tokens = {max_new_tokens}
[limits]
per_user_per_minute = 0
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
[web]
{web_lines}
""",
    )


class WebBot:
    """`run_bot` with the web chat; `url` is where it listens once started."""

    def __init__(self, config: Config, logs: Journal):
        self.config = config
        self.logs = logs
        self.run: BotRun | None = None
        self.url = ""

    async def start(self) -> WebBot:
        seen = len(self.logs.items)

        async def started() -> None:
            record = await self.logs.wait_for(lambda records: next((r for r in records[seen:] if r.msg == "web.started"), None), timeout=120)
            self.url = record.url

        self.run = await BotRun(self.config).start(started())
        return self

    async def stop(self) -> None:
        await self.run.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@asynccontextmanager
async def web_bot(config: Config) -> AsyncIterator[WebBot]:
    """A started `WebBot`, stopped on exit; nothing may have logged an error meanwhile."""
    with logged("adapters") as logs:
        bot = await WebBot(config, logs).start()
        try:
            yield bot
        finally:
            await bot.stop()
    errors = [(r.msg, r.levelname) for r in logs.items if r.levelno >= 40]
    assert not errors, errors


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium. `make test` installs it when missing."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 (one stat, before the browser starts)
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium package (make test installs it: apt-get install chromium).")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class PageProblems:
    """Script errors and content-security-policy violations of a page: a test ends with none."""

    def __init__(self, page: Page):
        self.seen: list[str] = []
        page.on("pageerror", lambda error: self.seen.append(f"script error: {error}"))
        page.on("console", lambda message: self.seen.append(message.text) if "Content Security Policy" in message.text else None)


async def open_chat(browser: Browser, url: str, ready: bool = True) -> tuple[Page, PageProblems]:
    """A new browser context (its own cookies: its own session) with the chat open (and, if `ready`,
    its script done loading)."""
    context = await browser.new_context(viewport={"width": 1100, "height": 720})
    context.set_default_timeout(60_000)
    page = await context.new_page()
    problems = PageProblems(page)
    await page.goto(url)
    if ready:
        await page.wait_for_selector("body[data-ready]")
    return page, problems


async def ask(page: Page, question: str, *images: Path) -> None:
    """Attach `images`, type `question` and send it, as a person would."""
    if images:
        await page.set_input_files("#file", [str(image) for image in images])
    await page.fill("#text", question)
    await page.click("#send")
