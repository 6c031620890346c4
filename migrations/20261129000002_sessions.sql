-- Addition to the data model: login sessions.
--
-- Register and Login hand the client a 32-byte random session token so it can
-- reconnect with `Resume` (or `Authorization: Bearer`) without paying for an
-- Argon2 verification each time. Only SHA-256(token) is stored: a leaked
-- table does not let anyone log in. A fast hash is enough because the token
-- has 256 bits of entropy; there is nothing to brute-force.

CREATE TABLE sessions (
    token_hash BYTEA PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id    UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);

-- Revoking every session of a user (account deletion) and the expiry sweep.
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
