-- The claim a connecting node tries first. A reconnect cost three
-- statements in cluster mode (look up the owner, claim, and later release),
-- and PostgreSQL CPU per reconnect was 24x the single node's (BENCHMARKS.md).
-- In the common case nobody else owns the user (their previous node let go
-- when their old socket closed), and this is the claim itself, in one
-- statement. When another incarnation owns the user it changes nothing and
-- names that owner (epoch NULL): the caller asks it to let go, then claims
-- with relay_claim.
CREATE FUNCTION relay_claim_if_free(p_user UUID, p_me UUID)
RETURNS TABLE (epoch BIGINT, previous UUID, max_seq BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_owner UUID;
BEGIN
    -- The lock relay_claim takes too (re-entrant within the transaction),
    -- so the look and the claim are one decision.
    PERFORM pg_advisory_xact_lock(7411, hashtext(p_user::text));
    SELECT p.incarnation INTO v_owner FROM relay_presence p WHERE p.user_id = p_user;
    IF v_owner IS NOT NULL AND v_owner <> p_me THEN
        RETURN QUERY SELECT NULL::BIGINT, v_owner, NULL::BIGINT;
        RETURN;
    END IF;
    RETURN QUERY SELECT c.epoch, c.previous, c.max_seq FROM relay_claim(p_user, p_me) AS c;
END $$;
