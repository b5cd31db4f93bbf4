"""Files people share in Slack, as the engine's attachments.

A file's `url_private` needs the bot token (`Authorization: Bearer ...`) and the `files:read` scope.
Without them Slack does not answer with an error but with its HTML login page, so a page is never
taken for an image: it ends in a message saying what is wrong. Redirects are followed by hand (the
SDK's `download`) so the token goes only to Slack's own hosts. These links come from Slack, not from people, so they are not
held to the link policy for private addresses, but the byte limit and the timeouts apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.sdk.platform import FetchRefused, download
from ground.messages import Attachment

# Hosts that serve Slack's files (commercial and GovSlack); the token is sent to these only.
SLACK_FILE_DOMAINS = ("slack.com", "slack-edge.com", "slack-files.com", "slack-gov.com")


class SlackFiles:
    """Makes attachments of Slack file objects and downloads them with the bot token."""

    def __init__(
        self,
        client: AsyncWebClient,
        token: str,
        *,
        connect_timeout: float,
        total_timeout: float,
        scopes: frozenset[str] | None = None,
        extra_hosts: frozenset[str] = frozenset(),
    ):
        """`scopes`: the token's scopes if Slack told them (to say exactly what is missing);
        `extra_hosts`: further hosts trusted with the token (the host of a custom `api_base_url`)."""
        self.client = client
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=total_timeout, sock_connect=connect_timeout)
        self.scopes = scopes
        self.extra_hosts = extra_hosts

    def attachment(self, file: dict) -> Attachment:
        """The engine's view of one entry of a message's `files`; nothing is downloaded yet."""
        name = file.get("name") or file.get("title") or file.get("id") or "file"

        async def read(max_bytes: int) -> bytes:
            return await self.download(file, name, max_bytes)

        return Attachment(name=name, read=read, size=file.get("size"), content_type=file.get("mimetype"))

    def trusts(self, url: str) -> bool:
        """Whether the bot token may be sent to `url`'s host."""
        host = (urlsplit(url).hostname or "").lower()
        return host in self.extra_hosts or any(host == domain or host.endswith("." + domain) for domain in SLACK_FILE_DOMAINS)

    async def download(self, file: dict, name: str, max_bytes: int) -> bytes:
        """The file's bytes (at most `max_bytes`), or `FetchRefused` saying in plain words why not."""
        if "url_private" not in file and file.get("file_access") == "check_file_info":
            file = await self._file_info(file["id"], name)  # Slack Connect and some shared files arrive as stubs
        url = file.get("url_private")
        if not url:
            raise FetchRefused(f"I can't open {name}: Slack doesn't let apps download it (file mode: {file.get('mode', 'unknown')}).")

        def hop(url: str) -> Mapping[str, str]:
            return {"Authorization": f"Bearer {self.token}"} if self.trusts(url) else {}

        def check(response: aiohttp.ClientResponse, url: str) -> None:
            if response.content_type == "text/html":
                raise FetchRefused(self._login_page(name, url, self.trusts(url)))

        async with aiohttp.ClientSession(timeout=self.timeout, trust_env=False) as session:
            return await download(session, url, max_bytes, name=name, source=" from Slack", hop=hop, check=check)

    async def _file_info(self, file_id: str, name: str) -> dict:
        try:
            return (await self.client.files_info(file=file_id))["file"]
        except SlackApiError as exc:
            raise FetchRefused(f"I can't open {name}: Slack refused to describe it ({exc.response.get('error', 'error')}).") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchRefused(f"I can't open {name}: Slack could not be asked about it ({type(exc).__name__}).") from None

    def _login_page(self, name: str, url: str, token_sent: bool) -> str:
        """What a login page instead of the file means, as precisely as we know it."""
        opening = f"I couldn't read {name}: Slack sent its login page instead of the file"
        if not token_sent:
            return f"{opening}, because the download went to {urlsplit(url).hostname}, which I don't send the bot token to."
        if self.scopes is not None and "files:read" not in self.scopes:
            return f"{opening} because the app lacks the files:read scope. An admin can add it under OAuth & Permissions and reinstall the app."
        return f"{opening}: the bot token was not accepted for it. Check that the app has the files:read scope and is installed in this workspace."
