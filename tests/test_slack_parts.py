"""The Slack adapter's parts on their own: reading and escaping Slack text, the slash command's syntax,
and file downloads from the fake Slack's file host (real HTTP on 127.0.0.1, the real slack_sdk client)."""

from __future__ import annotations

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.commands import SlashCommand, UsageError, parse_command
from adapters.slack.files import SlackFiles
from adapters.slack.text import escape, plain_text
from bot.images.fetch import FetchRefused
from tests.conftest import image_bytes
from tests.fake_slack import ALL_SCOPES, BOT_TOKEN, FakeSlack


@pytest.mark.parametrize(
    "text, plain",
    [
        ("<@UBOT> what is this?", "what is this?"),
        ("hey <@UBOT>, and <@U123> too", "hey , and @U123 too"),
        ("<@U123|ann> said so in <#C42|general>", "@ann said so in #general"),
        ("<!here> and <!channel> and <!subteam^S1|@designers>", "@here and @channel and @designers"),
        ("look: <https://x.org/cat.png> or <https://x.org/dog.png|a dog>", "look: https://x.org/cat.png or https://x.org/dog.png"),
        ("1 &lt; 2 &amp;&amp; 3 &gt; 2, and &amp;lt; stays", "1 < 2 && 3 > 2, and &lt; stays"),
    ],
)
def test_slack_text_reads_as_the_person_saw_it(text, plain):
    assert plain_text(text, "UBOT") == plain


def test_escaped_text_cannot_mention_or_link():
    assert escape("<!channel> <@U1> <https://x.org|x> & &amp;") == "&lt;!channel&gt; &lt;@U1&gt; &lt;https://x.org|x&gt; &amp; &amp;amp;"
    assert plain_text(escape("a < b & c > d")) == "a < b & c > d"


@pytest.mark.parametrize(
    "text, command",
    [
        ("", SlashCommand("help")),
        ("HELP me", SlashCommand("help")),
        ("reset", SlashCommand("reset")),
        ("ask https://x.org/a.png What is it?", SlashCommand("ask", "https://x.org/a.png", "What is it?")),
        ("ask   What is it?", SlashCommand("ask", None, "What is it?")),
        ("caption http://x.org/a", SlashCommand("caption", "http://x.org/a")),
        ("ask file:///etc/passwd What?", SlashCommand("ask", "file:///etc/passwd", "What?")),  # refused as a link later
        ("classify https://x.org/a.png cat, dog", SlashCommand("classify", "https://x.org/a.png", "cat, dog")),
        ("classify cat, dog", SlashCommand("classify", None, "cat, dog")),
        ("story", SlashCommand("story")),
    ],
)
def test_slash_command_syntax(text, command):
    assert parse_command(text) == command


def test_an_unknown_subcommand_shows_the_usage():
    with pytest.raises(UsageError, match=r"(?s)I don't know “paint”. Try:.*/look caption <image url>"):
        parse_command("paint https://x.org/a.png", "/look")


# -- files -----------------------------------------------------------------------------------


@pytest.fixture
async def slack():
    async with FakeSlack() as fake:
        yield fake
    assert not fake.unexpected


def files_of(slack: FakeSlack, scopes=ALL_SCOPES) -> SlackFiles:
    client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url)
    return SlackFiles(client, BOT_TOKEN, connect_timeout=5, total_timeout=10, scopes=frozenset(scopes), extra_hosts=frozenset({"127.0.0.1"}))


async def test_a_file_is_downloaded_with_the_token_also_after_a_redirect_on_slacks_host(slack):
    data = image_bytes()
    files = files_of(slack)
    for route in ("files", "redirect"):
        attachment = files.attachment(slack.add_file("red.png", data, route=route))
        assert (attachment.name, attachment.size, attachment.content_type) == ("red.png", len(data), "image/png")
        assert await attachment.read(10_000_000) == data


async def test_the_token_does_not_follow_a_redirect_to_another_host(slack):
    attachment = files_of(slack).attachment(slack.add_file("red.png", image_bytes(), route="elsewhere"))
    with pytest.raises(FetchRefused, match="the download went to localhost, which I don't send the bot token to"):
        await attachment.read(10_000_000)


async def test_a_login_page_names_the_missing_scope_or_the_token(slack):
    scopes = [s for s in ALL_SCOPES if s != "files:read"]
    async with FakeSlack(scopes=tuple(scopes)) as unscoped:
        attachment = files_of(unscoped, scopes=scopes).attachment(unscoped.add_file("red.png", image_bytes()))
        with pytest.raises(FetchRefused, match=r"red.png: Slack sent its login page instead of the file because the app lacks the files:read scope"):
            await attachment.read(10_000_000)
    revoked = SlackFiles(
        AsyncWebClient(token="xoxb-revoked", base_url=slack.api_url), "xoxb-revoked", connect_timeout=5, total_timeout=10, extra_hosts=frozenset({"127.0.0.1"})
    )
    with pytest.raises(FetchRefused, match="the bot token was not accepted for it"):
        await revoked.attachment(slack.add_file("red.png", image_bytes())).read(10_000_000)


async def test_the_byte_limit_cuts_a_download(slack):
    file = slack.add_file("big.png", image_bytes(size=(800, 800)))
    file.pop("size")  # Slack didn't say: the limit applies while reading
    with pytest.raises(FetchRefused, match=r"big.png: it is larger than the 0.0 MB limit"):
        await files_of(slack).attachment(file).read(1000)


async def test_stub_files_are_looked_up_and_hidden_ones_explained(slack):
    data = image_bytes()
    full = slack.add_file("shared.png", data)
    stub = {"id": full["id"], "file_access": "check_file_info"}  # as Slack Connect sends them
    assert await files_of(slack).attachment(stub).read(10_000_000) == data
    assert [call.params["file"] for call in slack.api("files.info")] == [full["id"]]
    hidden = {"id": "F1", "name": "old.png", "mode": "hidden_by_limit"}
    with pytest.raises(FetchRefused, match=r"I can't open old.png: Slack doesn't let apps download it \(file mode: hidden_by_limit\)"):
        await files_of(slack).attachment(hidden).read(10_000_000)
