"""The QuestDB the suite starts: a real server, as the service's own store would be."""

import asyncpg

from .questdb import QuestDB, pinned


async def test_a_real_questdb_answers_on_its_wire_port(questdb: QuestDB) -> None:
    conn = await asyncpg.connect(questdb.url)
    try:
        version = await conn.fetchval("SELECT build()")
        assert f"QuestDB {pinned()['QUESTDB_VERSION']}" in version
        assert questdb.data_dir.joinpath("db").is_dir()
    finally:
        await conn.close()
