"""The top floor, the one that knows every part: the config file, the CLI, assembling a process, logs,
health."""
