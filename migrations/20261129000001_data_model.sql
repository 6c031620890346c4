-- The data model of the user's specification (shared/spec/data-model.md):
-- users, identity keys, signed pre-keys, one-time pre-keys and messages, with
-- the columns, types, keys and constraints as written there.
--
-- Additions the spec implies or that the relay needs, each explained inline:
--   * ON DELETE CASCADE on every key table and on messages.recipient_id:
--     deleting a user removes their keys and the messages queued for them.
--   * messages.sender_id ON DELETE SET NULL: a message already accepted for
--     someone else stays deliverable when its sender deletes their account.
--   * A case-insensitive unique index on usernames.
--   * Composite primary keys are declared (user_id, id) rather than (id,
--     user_id): the same constraint, but the index then also serves every
--     "keys of this user" lookup.

CREATE TABLE users (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    username      VARCHAR(50)  NOT NULL UNIQUE,
    password_hash VARCHAR(255) NOT NULL,
    created_at    TIMESTAMPTZ DEFAULT now()
);

-- Usernames are unique regardless of case: 'Alice' and 'alice' collide.
-- The spec's UNIQUE(username) above stays; this index is the stricter rule
-- and also serves the case-insensitive lookups at login.
CREATE UNIQUE INDEX users_username_lower_key ON users (lower(username));

CREATE TABLE identity_keys (
    user_id         UUID PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    identity_key    BYTEA   NOT NULL,
    registration_id INTEGER NOT NULL
);

CREATE TABLE signed_pre_keys (
    id         INTEGER NOT NULL,
    user_id    UUID    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    public_key BYTEA   NOT NULL,
    signature  BYTEA   NOT NULL,
    created_at TIMESTAMPTZ DEFAULT now(),
    PRIMARY KEY (user_id, id)
);

CREATE TABLE one_time_pre_keys (
    id         INTEGER NOT NULL,
    user_id    UUID    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    public_key BYTEA   NOT NULL,
    PRIMARY KEY (user_id, id)
);

CREATE TABLE messages (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    sender_id    UUID REFERENCES users (id) ON DELETE SET NULL,
    recipient_id UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    content      BYTEA NOT NULL,
    created_at   TIMESTAMPTZ DEFAULT now(),
    expires_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX messages_recipient_id_idx ON messages (recipient_id);
