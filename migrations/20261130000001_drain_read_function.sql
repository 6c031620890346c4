-- The drain's ordered read as one statement.
--
-- The read must walk messages_recipient_seq_idx and stop after its LIMIT.
-- Right after a burst of stores the table's statistics are stale; the
-- planner then expects a handful of rows and picks a bitmap scan of *all*
-- the recipient's rows plus a sort that spills to disk (466 ms instead of
-- 3 ms per 512-row batch, quadratic over a long queue). Ruling those plans
-- out used to take a transaction: BEGIN, two SET LOCALs, the SELECT and
-- COMMIT, five round trips for every read, and every reconnect makes one.
-- A function's SET clauses scope the same two settings to the call, so the
-- read is a single statement: one round trip, and no transaction a
-- cancelled caller could leave half-finished on a pooled connection.
--
-- PL/pgSQL rather than SQL: a SQL function with SET clauses is never
-- inlined and is planned again on every call, while PL/pgSQL keeps the
-- statement's plan for the session.
--
-- Rows: the recipient's unexpired messages with after < seq < below, in
-- order, at most row_limit of them, and no more content than byte_budget
-- beyond the first row.
CREATE FUNCTION relay_drain_read(
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
BEGIN
    RETURN QUERY
    SELECT t.id, t.seq, t.sender_id, u.username, t.envelope_type,
           t.content, t.created_at, t.expires_at, t.client_timestamp
    FROM (SELECT m.id, m.seq, m.sender_id, m.envelope_type, m.content,
                 m.created_at, m.expires_at, m.client_timestamp,
                 sum(octet_length(m.content)) OVER (ORDER BY m.seq) AS running
          FROM messages m
          WHERE m.recipient_id = p_recipient AND m.seq > p_after
            AND m.seq < p_below AND m.expires_at > now()
          ORDER BY m.seq
          LIMIT p_limit) t
    LEFT JOIN users u ON u.id = t.sender_id
    WHERE t.running - octet_length(t.content) < p_budget
    ORDER BY t.seq;
END
$$;
