"""Chat platform adapters, one package (or module) per platform: each turns its platform's messages into
`ground.messages.IncomingMessage`s and posts the replies back, using only the SDK (`bot.sdk`) and the
ground's values. They are found through the `idefics_bot.adapters` entry points."""
