-- The drain's read stops at its byte budget.
--
-- relay_drain_read (20261130000001) took its LIMIT rows first and applied
-- the byte budget to them afterwards, through a running sum: with the
-- default 2,048 rows and 1 MiB, a read of 64 KiB messages fetched 2,048
-- heap rows to return 16. It now walks the same index in seq order and
-- stops as soon as the content read reaches the budget, so it visits the
-- rows it returns plus at most one cursor fetch (10 rows).
--
-- Same signature, same rows: the recipient's unexpired messages with
-- after < seq < below, in order, at most row_limit of them, each included
-- only while the content before it is below byte_budget (so the first row
-- always is, whatever its size, when the budget is positive).
-- octet_length on a TOASTed bytea reads its header, not its value.
CREATE OR REPLACE FUNCTION relay_drain_read(
    p_recipient UUID,
    p_after     BIGINT,
    p_below     BIGINT,
    p_limit     BIGINT,
    p_budget    BIGINT
)
RETURNS TABLE (
    id               UUID,
    seq              BIGINT,
    sender_id        UUID,
    sender_username  VARCHAR(50),
    envelope_type    SMALLINT,
    content          BYTEA,
    created_at       TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    client_timestamp BIGINT
)
LANGUAGE plpgsql STABLE
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    r     RECORD;
    total BIGINT := 0;
BEGIN
    FOR r IN
        SELECT t.id, t.seq, t.sender_id, u.username, t.envelope_type,
               t.content, t.created_at, t.expires_at, t.client_timestamp
        FROM (SELECT m.id, m.seq, m.sender_id, m.envelope_type, m.content,
                     m.created_at, m.expires_at, m.client_timestamp
              FROM messages m
              WHERE m.recipient_id = p_recipient AND m.seq > p_after
                AND m.seq < p_below AND m.expires_at > now()
              ORDER BY m.seq
              LIMIT p_limit) t
        LEFT JOIN users u ON u.id = t.sender_id
        ORDER BY t.seq
    LOOP
        EXIT WHEN total >= p_budget;
        id := r.id;
        seq := r.seq;
        sender_id := r.sender_id;
        sender_username := r.username;
        envelope_type := r.envelope_type;
        content := r.content;
        created_at := r.created_at;
        expires_at := r.expires_at;
        client_timestamp := r.client_timestamp;
        RETURN NEXT;
        total := total + octet_length(r.content);
    END LOOP;
END
$$;
