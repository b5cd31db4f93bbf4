"""Chat platform adapters: each turns its platform's messages into `bot.core.engine.IncomingMessage`s and
posts the replies back. They are found through the `idefics_bot.adapters` entry points."""
