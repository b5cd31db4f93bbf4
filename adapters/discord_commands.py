"""Slash commands and the "Describe image" message command.

    /ask question:<text> [image:<file>] [link:<url>]   a question about an image
    /caption [image] [link]        a short caption
    /classify labels:<"cat, dog, bird"> [image] [link]
    /story [image] [link]          a short story the image inspires
    /reset                         forget the conversation of this thread, or every one of this channel or DM
    /forget                        forget the person who runs it, everywhere (the answer only they see)
    Describe image                 (message menu) describe the images of a message

The commands are the shared table's (`bot.core.commands`), so they mean what they mean on every
platform. Without an image, the image commands use the last image seen in the channel (and say so).
Each command is deferred at once (Discord wants an answer within 3 seconds) and answered by editing
that response, so the commands also work where the app is installed to a person's account and the bot
is not a member (any server, DM or group DM): everything goes through the interaction.

Commands are sent to Discord only when they changed: a hash of each scope's command set is kept in
the state, and only the process that runs shard 0 (or `idefics-bot sync-commands`) sends them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import discord
from discord import app_commands

from adapters.discord_delivery import NO_PINGS, answer_interaction, note
from adapters.discord_input import PLATFORM, attachment_of, attachments_of, refusal, refusal_notice
from adapters.discord_settings import DiscordSettings
from bot.core.commands import COMMANDS, LAST_IMAGE_HINT
from bot.core.conversation import Author, ConversationKey
from bot.core.messages import Attachment, CommandRequest
from bot.platform.sdk import Platform

log = logging.getLogger(__name__)
# Discord's error code when the bot may not do this here (for commands: no applications.commands scope).
_MISSING_ACCESS = 50001

DESCRIBE = "Describe this image in detail."


def conversation_here(interaction: discord.Interaction) -> ConversationKey:
    """The conversation of the place a command was run in: a thread, a DM or a channel."""
    channel = interaction.channel
    if isinstance(channel, discord.Thread):
        return ConversationKey(PLATFORM, str(channel.parent_id), str(channel.id))
    return ConversationKey(PLATFORM, str(interaction.channel_id))


def command_set_hash(tree: app_commands.CommandTree, guild: discord.abc.Snowflake | None) -> str:
    """A digest of the commands `tree` would send for `guild` (None: the global ones)."""
    payload = sorted((command.to_dict(tree) for command in tree.get_commands(guild=guild)), key=lambda command: (command["type"], command["name"]))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class BotCommands(app_commands.CommandTree):
    """The bot's application commands, checked against the access rules before anything runs. They
    may be installed to servers and to people's accounts, and run in servers, DMs and group DMs."""

    def __init__(self, client: discord.Client, platform: Platform, settings: DiscordSettings):
        super().__init__(
            client,
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True),
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True),
        )
        self.platform = platform
        self.settings = settings
        self._add_commands()

    async def register(self, *, force: bool = False) -> list[str]:
        """Publish the commands, to the configured guilds (available at once) or globally, where they
        changed since they were last published (or everywhere, with `force`); the scopes published."""
        scopes: list[discord.Object | None] = [discord.Object(int(guild_id)) for guild_id in self.settings.command_guild_ids] or [None]
        published = []
        try:
            for guild in scopes:
                if guild is not None:
                    self.copy_global_to(guild=guild)
                scope = str(guild.id) if guild is not None else "global"
                name, digest = f"commands.{self.client.application_id}.{scope}", command_set_hash(self, guild)
                if not force and await self.platform.get_value(name) == digest:
                    continue
                await self.sync(guild=guild)
                await self.platform.set_value(name, digest)
                published.append(scope)
        except discord.HTTPException as error:
            # The bot can still chat; only the commands are missing. Discord's own words say why.
            extra = {"status": error.status, "code": error.code, "error": " | ".join(error.text.splitlines())[:1000]}
            if error.code == _MISSING_ACCESS:
                extra["hint"] = "invite the bot with the applications.commands scope"
            log.warning("discord.commands_not_registered", extra=extra)
        except Exception as error:  # an answer discord.py can't read must not stop the start
            log.error("discord.commands_not_registered", extra={"error": f"{type(error).__name__}: {error}"[:1000]}, exc_info=error)
        log.info("discord.commands", extra={"published": ",".join(published) or "none (unchanged)"})
        return published

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # Where the app is installed to the person's account, the bot may not know the server.
        me = self.client.user
        reason = "own message" if me is None else refusal(self.settings, interaction.user, interaction.channel, me, interaction.guild_id)
        self.platform.record("command" if reason is None else "refused")
        if reason is None:
            return True
        log.info("discord.refused", extra={"reason": reason, "user": interaction.user.id, "command": interaction.command and interaction.command.name})
        notice = refusal_notice(reason) if self.settings.refusal_notice else None
        if notice:
            await interaction.response.send_message(notice, ephemeral=True, allowed_mentions=NO_PINGS)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("discord.command_failed", extra={"command": interaction.command and interaction.command.name}, exc_info=error)
        sorry = note("Something went wrong on my side; please try again.")
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=sorry, allowed_mentions=NO_PINGS)
            else:
                await interaction.response.send_message(sorry, ephemeral=True, allowed_mentions=NO_PINGS)
        except discord.HTTPException:
            pass  # the interaction has expired; the log has the details

    # -- the commands ------------------------------------------------------------------------

    def _add_commands(self) -> None:
        images = {"image": f"An image to use. {LAST_IMAGE_HINT}", "link": "…or a link to an image"}

        def summary(name: str) -> str:
            return COMMANDS[name].summary.capitalize() + "."

        @self.command(description=summary("ask"))
        @app_commands.describe(question="What you want to know", **images)
        async def ask(interaction: discord.Interaction, question: str, image: discord.Attachment | None = None, link: str | None = None):
            await self._run(interaction, "ask", self._images(image, link), question)

        @self.command(description=summary("caption"))
        @app_commands.describe(**images)
        async def caption(interaction: discord.Interaction, image: discord.Attachment | None = None, link: str | None = None):
            await self._run(interaction, "caption", self._images(image, link))

        @self.command(description=summary("classify"))
        @app_commands.describe(labels='Comma-separated labels, e.g. "cat, dog, bird"', **images)
        async def classify(interaction: discord.Interaction, labels: str, image: discord.Attachment | None = None, link: str | None = None):
            await self._run(interaction, "classify", self._images(image, link), labels)

        @self.command(description=summary("story"))
        @app_commands.describe(**images)
        async def story(interaction: discord.Interaction, image: discord.Attachment | None = None, link: str | None = None):
            await self._run(interaction, "story", self._images(image, link))

        @self.command(description=summary("reset"))
        async def reset(interaction: discord.Interaction):
            await self._run(interaction, "reset", [])

        @self.command(description=summary("forget"))
        async def forget(interaction: discord.Interaction):
            await self._run(interaction, "forget", [], ephemeral=True)

        async def describe(interaction: discord.Interaction, message: discord.Message):
            files = [file for file in attachments_of(message.attachments, self.platform.images) if file.looks_like_image()]
            if not files:
                await interaction.response.send_message(note("That message has no image attached."), ephemeral=True, allowed_mentions=NO_PINGS)
                return
            await self._run(interaction, "ask", files, DESCRIBE)

        self.add_command(app_commands.ContextMenu(name="Describe image", callback=describe))

    def _images(self, image: discord.Attachment | None, link: str | None) -> list[Attachment]:
        files = [attachment_of(image, self.platform.images)] if image is not None else []
        if link:
            files.append(self.platform.link(link.strip()))
        return files

    async def _run(self, interaction: discord.Interaction, command: str, files: Sequence[Attachment], text: str = "", ephemeral: bool = False) -> None:
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        user = interaction.user
        request = CommandRequest(command, conversation_here(interaction), Author(str(user.id), user.display_name), tuple(files), text)
        await answer_interaction(interaction, self.platform.command(request))
