"""Where a reason comes from: the sources of evidence, and the one function that reads them.

    classify.py    `classify(Said, include_deleted, Rules) -> Verdict`: every rule that
                   turns evidence into a reason; the hop's misses, `explain`, `triage`
                   and the library's `get_session` all call it and hold none of their own
    tables.py      the lifecycle tables: the row and last audit entry of an ID in one
                   round trip, its timeline, the trails of many IDs at once
    in_flight.py   events this sidecar has seen and not stored yet, laid over the tables
    questdb.py     the service's own QuestDB: its table's partitions, TTL and WAL state,
                   and the row in the partition(s) the ID's minted time names
    retention.py   the configured retention, for a store that cannot be asked
    replay.py      the tables' evidence as it stood at a past moment
    breaker.py     the circuit breaker each source is read behind

`explain.Explainer` gathers the sources for one miss within the classification budget
and hands what they said to `classify`.
"""
