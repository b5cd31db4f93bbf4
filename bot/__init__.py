"""The platform-free bot, in floors that import only the floors below them (see the README's "How it
works" and the contracts in pyproject.toml, checked by `lint-imports`):

    runtime/   the process: config file -> parts, the CLI, one process's assembly, logs, health
    sdk/       what an adapter may use: the Platform, live replies, access rules, adapter settings
    core/      the engine: admission, conversations, generation, commands and tasks, retention
    images/    image intake: links fetched safely, bytes -> the model's picture
    state/     where conversations live: SQLite or PostgreSQL, the per-user rate buckets
    settings.py, metrics.py   each part's settings; the process's Prometheus metrics

Beneath them `model` (the model service) and `ground` (the values every part shares)."""
