"""Files named by the person at the keyboard (the CLI's `ask --image`, the terminal's `/image`): a path
on this machine, or an http(s) link fetched under the link rules."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.images.attachments import ImageIntake
from bot.images.intake import ImageRejected
from ground.files import FileTooLarge, NotARegularFile, read_regular_file
from ground.messages import Attachment


def local_attachment(source: str, intake: ImageIntake) -> Attachment:
    """An attachment for a file path or an http(s) link typed at the keyboard."""
    if "://" in source:
        return intake.link(source)
    path = Path(source).expanduser()

    async def read(max_bytes: int) -> bytes:
        try:
            return await asyncio.to_thread(read_regular_file, path, max_bytes)
        except FileTooLarge as too_large:
            raise ImageRejected(f"{path.name} is {too_large.size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB per image.") from None
        except NotARegularFile as odd:
            raise ImageRejected(f"{odd} I read images from files only.") from None
        except OSError as exc:
            raise ImageRejected(f"{source} can't be read: {exc.strerror or exc}.") from None

    return Attachment(name=path.name, read=read)
