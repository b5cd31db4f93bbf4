"""The core: from a turn to a reply (engine, conversations, prompts, tasks, fairness)."""
