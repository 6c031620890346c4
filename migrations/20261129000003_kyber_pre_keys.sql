-- Addition to the data model: Kyber-1024 (PQXDH) pre-keys.
--
-- The spec's model has identity, signed and one-time EC pre-keys only, but
-- current libsignal no longer builds a PreKeyBundle without a signed Kyber
-- pre-key, so a relay without them is useless to real clients. As in Signal:
--   * kyber_pre_keys holds one-time Kyber pre-keys, each consumed by a fetch;
--   * kyber_last_resort_keys holds one "last-resort" key per user, handed out
--     when the one-time keys run out and never consumed.
-- Every Kyber key carries an XEdDSA signature by the user's identity key.

CREATE TABLE kyber_pre_keys (
    id         INTEGER NOT NULL,
    user_id    UUID    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    public_key BYTEA   NOT NULL,
    signature  BYTEA   NOT NULL,
    PRIMARY KEY (user_id, id)
);

CREATE TABLE kyber_last_resort_keys (
    user_id    UUID PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    id         INTEGER NOT NULL,
    public_key BYTEA   NOT NULL,
    signature  BYTEA   NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
