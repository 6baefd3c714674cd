-- session-lens 007: spools being replayed, for every sidecar to see.
-- A recorder back from an outage says here what it is replaying (its newest
-- event's time) until the database has it all, and again with each batch
-- (`heartbeat`). Until then an ID minted no later than that event may have
-- evidence on its way: no sidecar calls it never_existed. A row whose heartbeat
-- has stopped (its recorder died) is ignored after a while and removed by the
-- next replay.

CREATE TABLE IF NOT EXISTS {replays} (
    recorder uuid PRIMARY KEY,
    events bigint NOT NULL,
    newest timestamptz NOT NULL,
    heartbeat timestamptz NOT NULL DEFAULT clock_timestamp()
);
