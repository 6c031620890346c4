-- The messages table swings by orders of magnitude in size (a burst of
-- offline messages, then a drain that deletes them all). With the default
-- thresholds (20% of rows changed) its statistics lag far behind, which once
-- made the drain's read pick a full scan plus sort. The drain query no longer
-- depends on statistics, but the sweeper and ack deletes still plan with
-- them: analyse and vacuum this table after much smaller changes.
ALTER TABLE messages SET (
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_scale_factor = 0.02
);
