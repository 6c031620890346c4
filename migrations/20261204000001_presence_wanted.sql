-- A node taking a user over says so in PostgreSQL, not only over Redis.
--
-- relay_presence.wanted_by: the incarnation that found the user owned by
--   another and is waiting to take them over. The owner's periodic claim
--   check reads it, closes the user's socket and lets them go, so a move
--   completes even when the request to let go cannot cross Redis (Redis
--   down, or the owner's link to it broken). Before this, the new node
--   claimed the user anyway after the release timeout while the old one
--   went on delivering to the old socket until its next check noticed:
--   a message stored for the user meanwhile was then passed by a later one
--   delivered live. A new claim clears it.
--
-- relay_claim_if_free gains p_take_from and p_take_epoch: the claim the
-- caller has already waited on for the whole release timeout. Its node has
-- stopped delivering by then (it saw the want, or its lease on its users
-- ran out: see docs/cluster.md), so the claim may replace it; any other
-- claim, even a newer one of the same node, is asked and waited on first.
-- A claim is therefore never taken from a connection nobody asked. It also
-- names the owner's epoch, for the caller to wait on.
--
-- The two-argument relay_claim_if_free of 20261202000002 stays, for nodes
-- of the previous release during a rolling upgrade (they neither record
-- nor read wants; see the README's upgrade note).
--
-- Every statement may run again (IF NOT EXISTS, OR REPLACE): the admin
-- test undoes the newest migration by forgetting it was applied.
ALTER TABLE relay_presence ADD COLUMN IF NOT EXISTS wanted_by UUID;

CREATE OR REPLACE FUNCTION relay_claim(p_user UUID, p_me UUID)
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
            SET incarnation = EXCLUDED.incarnation, epoch = EXCLUDED.epoch,
                claimed_at = now(), wanted_by = NULL;
    RETURN QUERY SELECT v_epoch, v_prev,
        (SELECT max(m.seq) FROM messages m WHERE m.recipient_id = p_user);
END $$;

CREATE OR REPLACE FUNCTION relay_claim_if_free(
    p_user UUID, p_me UUID, p_take_from UUID, p_take_epoch BIGINT)
RETURNS TABLE (epoch BIGINT, previous UUID, previous_epoch BIGINT, max_seq BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_owner UUID;
    v_epoch BIGINT;
BEGIN
    -- The lock relay_claim takes too (re-entrant within the transaction),
    -- so the look and the claim are one decision.
    PERFORM pg_advisory_xact_lock(7411, hashtext(p_user::text));
    SELECT p.incarnation, p.epoch INTO v_owner, v_epoch
        FROM relay_presence p WHERE p.user_id = p_user;
    IF v_owner IS NOT NULL AND v_owner <> p_me
       AND (v_owner IS DISTINCT FROM p_take_from OR v_epoch IS DISTINCT FROM p_take_epoch) THEN
        UPDATE relay_presence SET wanted_by = p_me WHERE user_id = p_user;
        RETURN QUERY SELECT NULL::BIGINT, v_owner, v_epoch, NULL::BIGINT;
        RETURN;
    END IF;
    RETURN QUERY SELECT c.epoch, c.previous, v_epoch, c.max_seq FROM relay_claim(p_user, p_me) AS c;
END $$;
