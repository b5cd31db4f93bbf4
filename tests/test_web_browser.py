"""The web chat in a real browser: headless Chromium (Debian's package) driven by Playwright, against the
bot started as `idefics-bot run` starts it, on the tiny checkpoint. A `ModelTap` makes the model say
what a test needs and can hold it mid-answer; tests wait on what the page shows, never on sleeps.

With SCREENSHOTS=DIR set (`make screenshot`), the first test saves the page answering a question about
an image as DIR/web-chat.png: the README's picture.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from PIL import Image, ImageDraw

from adapters.web.adapter import STOPPED
from tests.conftest import image_bytes
from tests.model_tap import ModelTap
from tests.web_chat import TOKEN, ask, open_chat, web_bot, web_config
from tests.web_chat import browser as browser

ANSWER = "A small red house with a brown roof stands on green grass under a blue sky, and the sun shines at the top right."


def house(path: Path) -> Path:
    """A simple drawn picture to ask about."""
    picture = Image.new("RGB", (480, 320), (135, 190, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 230, 480, 320), fill=(70, 160, 60))
    draw.ellipse((380, 30, 440, 90), fill=(250, 215, 60))
    draw.rectangle((150, 150, 290, 250), fill=(190, 40, 40))
    draw.polygon([(135, 152), (220, 90), (305, 152)], fill=(110, 70, 40))
    draw.rectangle((205, 195, 235, 250), fill=(90, 50, 30))
    picture.save(path)
    return path


async def test_a_question_about_an_image_streams_in_and_is_still_there_after_a_restart(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, max_new_tokens=64)
    picture = house(tmp_path / "house.png")
    async with web_bot(config) as bot:
        answer = tap.spelled(ANSWER)
        page, problems = await open_chat(browser, bot.url)
        tap.say = ANSWER
        tap.gate.clear()
        await ask(page, "What is in this picture?", picture)
        bubble = page.locator(".message.assistant").last
        # The model holds after the sentence, before its end: the text is on the page, the reply unfinished.
        await tap.wait_held()
        await page.wait_for_function("text => document.querySelector('.message.assistant .body').textContent.startsWith(text)", arg=answer[:40])
        assert await bubble.get_attribute("class") == "message assistant"  # still streaming
        tap.gate.set()
        await page.wait_for_selector(".message.assistant.done")
        assert await bubble.locator(".body").inner_text() == answer
        assert await page.locator("#conversations li").all_inner_texts() == ["What is in this picture?"]
        assert await page.locator("#title").inner_text() == "What is in this picture?"
        assert "<image>" in tap.prompt() and "What is in this picture?" in tap.prompt()  # the image reached the model
        if os.environ.get("SCREENSHOTS"):
            await page.screenshot(path=Path(os.environ["SCREENSHOTS"]) / "web-chat.png")
        conversation = page.url.split("#")[1]

        await bot.restart()
        await page.goto(f"{bot.url}#{conversation}")  # the same browser session, at the restarted bot's port
        await page.wait_for_selector("body[data-ready]")
        assert await page.locator(".message.user .plain").all_inner_texts() == ["What is in this picture?"]
        assert await page.locator(".message.assistant .body").all_inner_texts() == [answer]
        shown = page.locator(".message.user img")
        await shown.wait_for()
        assert await shown.evaluate("image => image.complete && image.naturalWidth") > 0  # the stored image, served back
        assert not problems.seen


async def test_stop_ends_a_long_answer_and_a_queued_question_shows_its_place(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, max_new_tokens=400, max_batch_size=1)
    async with web_bot(config) as bot:
        page, problems = await open_chat(browser, bot.url)
        other, _ = await open_chat(browser, bot.url)
        tap.say, tap.finish = "Once upon a time", False  # and on and on: a long story
        tap.gate.clear()
        await ask(page, "Tell me a long story.")
        await tap.wait_held()
        await page.wait_for_function("() => document.querySelector('.message.assistant .body').textContent.length > 0")
        await ask(other, "And me?")  # one request at a time in the model: this one waits
        await other.wait_for_selector("text=Waiting for the model: you're #1 in line.")
        await page.click("#stop")
        await page.wait_for_selector(".message.assistant.done.stopped")
        assert STOPPED in await page.locator(".message.assistant .note").inner_text()
        assert await page.locator("#stop").is_hidden()
        tap.gate.set()
        await other.wait_for_selector(".message.assistant.done")
        # A stopped question isn't kept: its conversation is gone from the list after a reload.
        await page.reload()
        await page.wait_for_selector("body[data-ready]")
        assert await page.locator("#conversations li").count() == 0
        assert not problems.seen


async def test_a_refused_image_shows_its_reason(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint)
    (tmp_path / "scan.png").write_bytes(b"%PDF-1.5 not an image")
    async with web_bot(config) as bot:
        page, problems = await open_chat(browser, bot.url)
        await ask(page, "What is this?", tmp_path / "scan.png")
        note = page.locator(".message.assistant.done .note")
        await note.wait_for()
        assert "scan.png is a PDF document, not an image" in await note.inner_text()
        # In the question: the file's name and the reason, not a broken-image icon.
        refused = page.locator(".message.user .refused")
        assert await refused.locator("strong").inner_text() == "scan.png"
        assert "is a PDF document, not an image" in await refused.inner_text()
        assert await page.locator(".message.user img").count() == 0
        assert not tap.prompts  # refused before the model
        assert not problems.seen


async def test_images_pasted_and_dropped_go_with_the_message(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint)
    async with web_bot(config) as bot:
        page, problems = await open_chat(browser, bot.url)
        # What the browser hands the page when a person pastes an image, then drops one from their files.
        await page.evaluate(
            """async (png) => {
                const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
                const carrying = (name) => {
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], name, {type: 'image/png'}));
                    return transfer;
                };
                document.querySelector('#text').dispatchEvent(new ClipboardEvent('paste', {clipboardData: carrying('pasted.png'), bubbles: true}));
                document.querySelector('#messages').dispatchEvent(new DragEvent('drop', {dataTransfer: carrying('dropped.png'), bubbles: true}));
            }""",
            base64.b64encode(image_bytes()).decode(),
        )
        assert await page.locator("#attachments img").evaluate_all("images => images.map((image) => image.alt)") == ["pasted.png", "dropped.png"]
        await page.locator("#attachments .remove").first.click()  # changed their mind about the first
        await ask(page, "What are these?")
        await page.wait_for_selector(".message.assistant.done")
        assert await page.locator(".message.user img").evaluate_all("images => images.map((image) => image.alt)") == ["dropped.png"]
        assert tap.prompt().count("<image>") == 1
        assert not problems.seen


async def test_markdown_is_rendered_and_html_is_shown_as_text(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, max_new_tokens=200)
    reply = (
        "**Bold** and `code`\n\n- one\n- two\n\n"
        "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> [click](javascript:alert(1))"
    )
    tap.say = reply
    async with web_bot(config) as bot:
        page, problems = await open_chat(browser, bot.url)
        await ask(page, "<b>hi</b><img src=x onerror=\"document.title='pwned'\">")
        await page.wait_for_selector(".message.assistant.done")
        answer = page.locator(".message.assistant .body")
        assert await answer.locator("strong").inner_text() == "Bold"
        assert await answer.locator("code").inner_text() == "code"
        assert await answer.locator("li").all_inner_texts() == ["one", "two"]
        assert await page.locator(".message img, .message script, .message a").count() == 0
        assert "<script>document.title='pwned'</script>" in await answer.inner_text()
        assert "[click](javascript:alert(1))" in await answer.inner_text()
        assert await page.locator(".message.user").inner_text() == "<b>hi</b><img src=x onerror=\"document.title='pwned'\">"
        assert await page.title() == "IDEFICS"
        assert not problems.seen


async def test_browser_sessions_keep_their_conversations_to_themselves(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint)
    (tmp_path / "red.png").write_bytes(image_bytes())
    async with web_bot(config) as bot:
        ann, _ = await open_chat(browser, bot.url)
        await ask(ann, "Ann's first question", tmp_path / "red.png")
        await ann.wait_for_selector(".message.assistant.done")
        first = ann.url.split("#")[1]
        await ann.reload()  # the question's image, now served from the store
        image = await ann.locator(".message.user img").get_attribute("src")
        assert image.startswith(f"/api/conversations/{first}/images/")
        await ann.click("#new-conversation")
        await ask(ann, "Ann's second question")
        await ann.wait_for_selector(".message.assistant.done")
        await ann.wait_for_function("() => document.querySelectorAll('#conversations li').length === 2")
        assert await ann.locator("#conversations li").all_inner_texts() == ["Ann's second question", "Ann's first question"]

        bob, _ = await open_chat(browser, f"{bot.url}#{first}")  # another browser: even knowing the address
        assert await bob.locator("#conversations li").count() == 0
        assert await bob.locator(".message").count() == 0
        seen = await bob.evaluate(
            """async ([conversation, image]) => [
                (await fetch(`/api/conversations/${conversation}`)).status,
                (await fetch(image)).status,
                (await (await fetch(`/api/conversations/${conversation}/reset`, {method: 'POST'})).json()).forgotten,
            ]""",
            [first, image],
        )
        assert seen == [404, 404, 0]  # Bob's reset reaches only his own (empty) conversation of that id

        # Reset forgets the open conversation; the other stays.
        await ann.goto(f"{bot.url}#{first}")  # the same page: only the address's fragment changes
        await ann.locator(".message.user .plain", has_text="Ann's first question").wait_for()
        await ann.click("#reset")
        await ann.wait_for_function("() => document.querySelectorAll('#conversations li').length === 1")
        assert await ann.locator("#conversations li").all_inner_texts() == ["Ann's second question"]
        assert await ann.locator(".message").count() == 0


async def test_an_exposed_chat_asks_for_the_token(tmp_path, tiny_checkpoint, browser, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, web={"host": "0.0.0.0", "token": TOKEN})
    async with web_bot(config) as bot:
        page, problems = await open_chat(browser, bot.url, ready=False)
        assert await page.locator("input[name=token]").count() == 1
        statuses = await page.evaluate("async () => [(await fetch('/api/conversations')).status, (await fetch('/static/app.js')).status]")
        assert statuses == [401, 200]  # the page's own files are public; nothing else is
        await page.fill("input[name=token]", "not-the-token-at-all")
        await page.click("button[type=submit]")
        await page.wait_for_selector("text=That token isn't the one in [web] token.")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready]")
        await ask(page, "Hello?")
        await page.wait_for_selector(".message.assistant.done")
        assert not problems.seen

