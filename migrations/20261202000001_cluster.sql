-- Cluster mode (several relay nodes on one database and one Redis).
--
-- Two tables beyond the data model, both used only when --redis-url is set:
--
-- relay_nodes: one row per node incarnation (every start is a new one).
--   Membership lives here, in PostgreSQL, not in Redis: a node is declared
--   dead when its heartbeat, written with PostgreSQL's own clock, is older
--   than the dead-after setting. A Redis restart (which empties Redis) or a
--   node losing only its Redis connection therefore never kills anybody.
--   A node whose heartbeat update finds its row marked dead knows it was
--   fenced out (it was paused or cut off) and stops serving.
--
-- relay_presence: which node incarnation holds each online user's socket
--   (one user is one device, so at most one). It is the fence: a node
--   stores a user's messages only while the user has no owner or it is the
--   owner (relay_fence below, in the storing transaction), so a stale or
--   paused node can never store behind the back of the node that now
--   delivers live. `epoch` tells one claim from the next, so a late release
--   of an earlier claim cannot remove a newer one. Rows go with the user
--   (ON DELETE CASCADE) and with a dead node (deleted when it is declared
--   dead).
CREATE TABLE relay_nodes (
    incarnation  UUID PRIMARY KEY,
    node_id      TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    dead         BOOLEAN NOT NULL DEFAULT false
);

CREATE INDEX relay_nodes_alive_idx ON relay_nodes (heartbeat_at) WHERE NOT dead;

CREATE TABLE relay_presence (
    user_id     UUID PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    incarnation UUID NOT NULL,
    epoch       BIGINT NOT NULL,
    claimed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX relay_presence_incarnation_idx ON relay_presence (incarnation);

CREATE SEQUENCE relay_presence_epoch;

-- The storing side of the fence. Takes a shared transaction-scoped advisory
-- lock per recipient (in key order, so two batches can never deadlock), then
-- returns the recipients owned by another incarnation: the caller must not
-- store for those, and forwards to the owner instead. A claim takes the
-- same lock exclusively, so it waits for every store that checked before
-- it, and every store that checks after it sees the new owner: a new
-- owner's drain can never miss a message stored behind its back.
CREATE FUNCTION relay_fence(p_recipients UUID[], p_me UUID)
RETURNS TABLE (user_id UUID, incarnation UUID)
LANGUAGE plpgsql AS $$
DECLARE
    k INT;
BEGIN
    FOR k IN SELECT DISTINCT hashtext(r::text) AS h FROM unnest(p_recipients) AS r ORDER BY h LOOP
        PERFORM pg_advisory_xact_lock_shared(7411, k);
    END LOOP;
    RETURN QUERY
        SELECT p.user_id, p.incarnation FROM relay_presence p
        WHERE p.user_id = ANY (p_recipients) AND p.incarnation <> p_me;
END $$;

-- The claiming side: waits for stores in flight for the user, then makes
-- p_me the owner under a fresh epoch. Returns the epoch, the incarnation
-- that owned the user before (NULL if none) and the highest sequence number
-- stored for them, which the new owner's numbering must exceed.
CREATE FUNCTION relay_claim(p_user UUID, p_me UUID)
RETURNS TABLE (epoch BIGINT, previous UUID, max_seq BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch BIGINT := nextval('relay_presence_epoch');
    v_prev UUID;
BEGIN
    PERFORM pg_advisory_xact_lock(7411, hashtext(p_user::text));
    SELECT p.incarnation INTO v_prev FROM relay_presence p WHERE p.user_id = p_user;
    INSERT INTO relay_presence AS p (user_id, incarnation, epoch)
        VALUES (p_user, p_me, v_epoch)
        ON CONFLICT (user_id) DO UPDATE
            SET incarnation = EXCLUDED.incarnation, epoch = EXCLUDED.epoch, claimed_at = now();
    RETURN QUERY SELECT v_epoch, v_prev,
        (SELECT max(m.seq) FROM messages m WHERE m.recipient_id = p_user);
END $$;
