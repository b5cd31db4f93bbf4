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

Commands are published by the process that runs shard 0 (or `idefics-bot sync-commands`), which
reconciles them with what Discord reports: for each scope (global, or one guild) it fetches Discord's
commands and compares them with the bot's, then publishes the bot's set where they differ (a command
changed or deleted elsewhere is repaired) and clears the scopes the config no longer names (switching
`command_guild_ids` to global removes the guild copies, which would show every command twice). The
guilds it published to are kept in the state, so their commands can be cleared later. Publishing is
rate limited; fetching is not, and nothing is published when nothing differs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import discord
from discord import app_commands

from adapters.discord.delivery import NO_PINGS, answer_interaction, note
from adapters.discord.input import PLATFORM, attachment_of, attachments_of, refusal, refusal_notice
from adapters.discord.settings import DiscordSettings
from bot.sdk.platform import Platform
from ground.commands import COMMANDS, LAST_IMAGE_HINT
from ground.conversation import Author, ConversationKey
from ground.messages import Attachment, CommandRequest

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


GLOBAL = "global"
# What makes a command (Discord's application command object), with the value Discord assumes when a
# field is left out: any other field Discord reports (ids, version, localisations, the deprecated
# dm_permission) doesn't change what people see.
_COMMAND_FIELDS: dict[str, Any] = {
    "type": 1, "name": None, "description": "", "options": [], "default_member_permissions": None, "nsfw": False,
    "integration_types": None, "contexts": None,
}  # fmt: skip
_OPTION_FIELDS: dict[str, Any] = {
    "type": None, "name": None, "description": "", "required": False, "choices": None, "options": [], "channel_types": None,
    "min_value": None, "max_value": None, "min_length": None, "max_length": None, "autocomplete": False,
}  # fmt: skip


def _guilds(stored: str | None) -> set[str]:
    """The guild ids kept in the state (none if nothing, or something unreadable, was kept)."""
    try:
        guilds = json.loads(stored) if stored else []
    except ValueError:
        return set()
    return {str(guild) for guild in guilds} if isinstance(guilds, list) else set()


def comparable(commands: Sequence[Mapping[str, Any]]) -> list[dict]:
    """A command set as Discord reports it, or as we send it, in a form that compares equal when people
    would see the same commands."""

    def normal(item: Mapping[str, Any], fields: dict[str, Any]) -> dict:
        shown = {}
        for name, default in fields.items():
            value = item.get(name, default)
            if name == "options":
                value = [normal(option, _OPTION_FIELDS) for option in value or []]
            elif name in ("integration_types", "contexts", "channel_types") and value is not None:
                value = sorted(value)
            if value != default and value is not None:
                shown[name] = value
        return shown

    return sorted((normal(command, _COMMAND_FIELDS) for command in commands), key=lambda command: (command.get("type", 1), command["name"]))


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
        """Reconcile the commands with what Discord reports (see the module's docstring): publish them to
        the configured guilds (available at once) or globally where they differ (everywhere, with
        `force`), and clear them from the scopes no longer configured; returns the scopes changed."""
        application = self.client.application_id
        if application is None:  # known once logged in
            raise app_commands.MissingApplicationID
        wanted = [str(guild_id) for guild_id in self.settings.command_guild_ids] or [GLOBAL]
        recorded = f"commands.{application}.guilds"  # the guilds the bot's commands were published to
        known = _guilds(await self.platform.get_value(recorded))
        changed: list[str] = []
        kept: set[str] = set()
        for scope in dict.fromkeys([*wanted, GLOBAL, *sorted(known)]):
            try:
                if await self._reconcile(application, scope, scope in wanted, force=force and scope in wanted):
                    changed.append(scope)
            except discord.HTTPException as error:
                # The bot can still chat; only the commands are missing. Discord's own words say why.
                extra = {"scope": scope, "status": error.status, "code": error.code, "error": " | ".join(error.text.splitlines())[:1000]}
                if error.code == _MISSING_ACCESS:
                    extra["hint"] = "invite the bot with the applications.commands scope"
                log.warning("discord.commands_not_registered", extra=extra)
                kept.add(scope)
            except Exception as error:  # an answer discord.py can't read must not stop the start
                log.error("discord.commands_not_registered", extra={"scope": scope, "error": f"{type(error).__name__}: {error}"[:1000]}, exc_info=error)
                kept.add(scope)
        guilds = {scope for scope in wanted if scope != GLOBAL} | (kept & known)  # a guild not cleared yet stays known
        await self.platform.set_value(recorded, json.dumps(sorted(guilds)))
        log.info("discord.commands", extra={"published": ",".join(changed) or "none (unchanged)"})
        return changed

    async def _reconcile(self, application: int, scope: str, wanted: bool, *, force: bool) -> bool:
        """Make Discord's commands in `scope` the bot's (`wanted`) or none; whether anything was sent."""
        http = self.client.http
        guild = None if scope == GLOBAL else discord.Object(int(scope))
        if guild is not None and wanted:
            self.copy_global_to(guild=guild)
        ours = [command.to_dict(self) for command in self.get_commands(guild=guild)] if wanted else []
        if not force:
            reported = await (http.get_global_commands(application) if guild is None else http.get_guild_commands(application, guild.id))
            if comparable(reported) == comparable(ours):
                return False
        if wanted:
            await self.sync(guild=guild)
        elif guild is None:
            await http.bulk_upsert_global_commands(application, [])
        else:
            await http.bulk_upsert_guild_commands(application, guild.id, [])
        log.info("discord.commands_reconciled", extra={"scope": scope, "commands": len(ours)})
        return True

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
