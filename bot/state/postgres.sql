-- The schema of the PostgreSQL state (`bot.state.postgres.PostgresStore`), as migrations applied in order, each once:
-- a "-- migration N" line starts migration N; the schema's version is the number of the last one applied.
-- A migration that has shipped is never edited: a change of the schema is the next migration.

-- migration 1
CREATE TABLE conversations (
    id BIGSERIAL PRIMARY KEY,
    platform TEXT NOT NULL, channel TEXT NOT NULL, thread TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (platform, channel, thread)
);
CREATE TABLE turns (
    id BIGSERIAL PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    author_id TEXT, author_name TEXT,
    parts JSONB NOT NULL,
    message_id TEXT NOT NULL DEFAULT '',
    dropped INTEGER NOT NULL DEFAULT 0,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX turns_by_conversation ON turns (conversation_id, id);
CREATE TABLE messages (
    platform TEXT NOT NULL, message_id TEXT NOT NULL,
    conversation_id BIGINT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    PRIMARY KEY (platform, message_id)
);
CREATE TABLE events (
    platform TEXT NOT NULL, event_id TEXT NOT NULL, seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, event_id)
);
CREATE TABLE channel_images (
    platform TEXT NOT NULL, channel TEXT NOT NULL,
    digest TEXT NOT NULL, name TEXT NOT NULL, seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, channel)
);
CREATE TABLE images (
    digest TEXT PRIMARY KEY,
    data BYTEA NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- migration 2
-- Answers a process may leave unfinished: who is answering a question, what it has posted, and
-- each process's lease.
ALTER TABLE turns ADD COLUMN answerer TEXT;
CREATE INDEX questions_by_time ON turns (created) WHERE role = 'user';
CREATE TABLE replies (
    platform TEXT NOT NULL, question TEXT NOT NULL, messages JSONB NOT NULL, seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, question)
);
CREATE TABLE processes (id TEXT PRIMARY KEY, started TIMESTAMPTZ NOT NULL DEFAULT now(), seen TIMESTAMPTZ NOT NULL DEFAULT now());

-- migration 3
-- The per-user token buckets every process takes from (`SharedRateLimiter`).
CREATE TABLE rate_buckets (
    bucket TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    granted BOOLEAN NOT NULL,
    updated TIMESTAMPTZ NOT NULL
);

-- migration 4
-- Votes on answers, and values adapters keep (the hash of the Discord commands they published).
CREATE TABLE feedback (
    turn_id BIGINT NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    vote TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (turn_id, user_id)
);
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);

-- migration 5
-- Who posted a reply's messages, and where: a process that stops before storing the question
-- leaves them for another to remove.
ALTER TABLE replies ADD COLUMN owner TEXT;
ALTER TABLE replies ADD COLUMN channel TEXT NOT NULL DEFAULT '';
ALTER TABLE replies ADD COLUMN thread TEXT NOT NULL DEFAULT '';
