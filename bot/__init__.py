"""The platform-free core of idefics-bot: configuration, conversations, images, state, the engine, the CLI."""
