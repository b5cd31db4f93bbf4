"""The buttons on the Discord adapter's answers: "Stop" while a reply is written, "Regenerate" on a
finished one.

Each button is a `DynamicItem`: its custom_id carries what it is about (`idefics:stop:<reply id>`,
`idefics:regenerate:<answer turn id>:<asker id>`), and the client registers the two templates at
start-up, so buttons keep working after a restart. The adapter checks a click against what it knows:
the reply being written and its asker (Stop), the conversation's latest answer (Regenerate), and the
person against the asker unless the config lets anyone.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import discord


class ButtonHandler(Protocol):
    """What the buttons call: the adapter."""

    async def stop_pressed(self, interaction: discord.Interaction, reply: int) -> None: ...

    async def regenerate_pressed(self, interaction: discord.Interaction, turn_id: int, asker: int) -> None: ...


def _handler(interaction: discord.Interaction) -> ButtonHandler:
    return interaction.client.adapter  # type: ignore[attr-defined]  # the adapter's clients carry it


class StopButton(discord.ui.DynamicItem[discord.ui.Button], template=r"idefics:stop:(?P<reply>\d+)"):
    """Stops the reply `reply` (the id of the message or click it answers)."""

    def __init__(self, reply: int):
        super().__init__(discord.ui.Button(label="Stop", style=discord.ButtonStyle.danger, custom_id=f"idefics:stop:{reply}"))
        self.reply = reply

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /) -> StopButton:
        return cls(int(match["reply"]))

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _handler(interaction).stop_pressed(interaction, self.reply)


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button], template=r"idefics:regenerate:(?P<turn>\d+):(?P<asker>\d+)"):
    """Answers the question of the stored answer `turn` again (asked by `asker`)."""

    def __init__(self, turn: int, asker: int):
        super().__init__(discord.ui.Button(label="Regenerate", style=discord.ButtonStyle.secondary, custom_id=f"idefics:regenerate:{turn}:{asker}"))
        self.turn, self.asker = turn, asker

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /) -> RegenerateButton:
        return cls(int(match["turn"]), int(match["asker"]))

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _handler(interaction).regenerate_pressed(interaction, self.turn, self.asker)


def buttons(*items: discord.ui.DynamicItem) -> discord.ui.View:
    """A view of these buttons, to send with a message (`timeout=None`: they last as long as the message)."""
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


BUTTON_TYPES = (StopButton, RegenerateButton)
