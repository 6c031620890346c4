-- Additions to the messages table for ordered, typed delivery.
--
-- seq: per-recipient delivery order. The relay assigns it when it accepts a
--   message, before it knows whether the message goes live or to storage, so
--   a message stored late (a recipient that disconnected before acking) still
--   sorts before messages accepted after it. It comes from one counter that
--   is strictly increasing across restarts (seeded from max(seq) and the
--   clock). The drain reads `ORDER BY seq`, so (recipient_id, seq) replaces
--   the plain recipient index of the spec: it serves the same lookups.
-- envelope_type: Signal's envelope type (1 ciphertext, 3 pre-key bundle,
--   5 server delivery receipt, 8 plaintext content), needed by the recipient
--   to pick the decryption path.
-- client_timestamp: the sender's clock, relayed untouched (Unix ms).
--
-- Idempotent retries need no column: a message sent with a client message id
-- gets an id derived from (sender, client message id), so the primary key
-- itself refuses a second copy.

ALTER TABLE messages
    ADD COLUMN seq              BIGINT   NOT NULL,
    ADD COLUMN envelope_type    SMALLINT NOT NULL CHECK (envelope_type IN (1, 3, 5, 8)),
    ADD COLUMN client_timestamp BIGINT   NOT NULL DEFAULT 0;

DROP INDEX messages_recipient_id_idx;
CREATE INDEX messages_recipient_seq_idx ON messages (recipient_id, seq);

-- The expiry sweeper deletes in bounded batches, oldest expiry first.
CREATE INDEX messages_expires_at_idx ON messages (expires_at);
