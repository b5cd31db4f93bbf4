"""Where conversations live between messages and across restarts: SQLite or PostgreSQL."""
