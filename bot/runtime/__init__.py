"""Running the bot: configuration, the CLI, assembling a process, logs, metrics, health."""
