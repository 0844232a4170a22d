"""``broker mappings import`` and ``export``: an existing mapping loaded all or nothing, every bad
line named, and the table written back out in the same format."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.db import create_pool, query
from broker.errors import ConflictError, NotFoundError
from broker.mapping import accounts
from broker.mapping.bulkload import RowLines
from broker.mapping.cache import MappingCache, listen
from broker.mapping.fileformat import (
    FileFormat,
    LineProblem,
    Record,
    detect_format,
    format_header,
    format_row,
    parse_batches,
)
from broker.mapping.store import MappingStore
from broker.mapping.transfer import BULK_ROWS, export_mappings, import_mappings
from tests.waiting import until

# ---------------------------------------------------------------------- the file format (pure)

ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30
).filter(lambda s: s == s.strip() and s.strip())


def _parse(text: str, file_format: FileFormat) -> tuple[list[Record], list[LineProblem]]:
    """The file's records and problems, read two lines a batch (so batches end mid-file): good
    or bad, a batch never holds more, whatever the lines are like."""
    batches = list(parse_batches(io.StringIO(text, newline=""), file_format, 2))
    assert all(len(b.records) + len(b.problems) <= 2 for b in batches)
    return [r for b in batches for r in b.records], [p for b in batches for p in b.problems]


@given(
    rows=st.lists(st.tuples(ids, st.sampled_from(["D2", "p.1"]), ids, st.booleans()), max_size=8)
)
def test_every_row_written_reads_back_as_itself(rows: list[tuple[str, str, str, bool]]) -> None:
    # Commas, quotes and non-ASCII in IDs survive both formats.
    for file_format in FileFormat:
        text = format_header(file_format) + "".join(format_row(file_format, *r) for r in rows)
        records, problems = _parse(text, file_format)
        assert [tuple(r)[1:] for r in records] == rows
        assert not problems


def test_each_malformed_line_is_named_with_what_is_wrong() -> None:
    text = (
        "internal_id,domain,external_id,primary\n"
        "u1,D2,e1,true\n"
        "u2,D2,e2\n"
        "u3,D2,e3,yes\n"
        " u4,D2,e4,true\n"
        "u5,no domain,e5,false\n"
        "\n"
        "u6,D2,e6,FALSE\n"
    )
    records, found = _parse(text, FileFormat.CSV)
    problems = {p.line: p.message for p in found}
    assert sorted(problems) == [3, 4, 5, 6]
    assert "3 fields, not 4" in problems[3]
    assert "'yes': write true or false" in problems[4]
    assert "internal ID ' u4' is not an ID" in problems[5]
    assert "domain 'no domain'" in problems[6]
    assert records == [Record(2, "u1", "D2", "e1", True), Record(8, "u6", "D2", "e6", False)]


def test_json_lines_are_checked_line_by_line() -> None:
    text = (
        '{"internal_id":"u1","domain":"D2","external_id":"e1","primary":true}\n'
        '{"internal_id":"u2","domain":"D2","external_id":"e2","primary":"true"}\n'
        '{"internal_id":"u3","domain":"D2","external_id":"e3"}\n'
        "{not json\n"
        '{"internal_id":7,"domain":"D2","external_id":"e4","primary":false}\n'
    )
    records, problems = _parse(text, FileFormat.JSONL)
    assert [p.line for p in problems] == [2, 3, 4, 5]
    assert records == [Record(1, "u1", "D2", "e1", True)]


def test_the_format_is_known_by_extension_or_by_content() -> None:
    assert detect_format(Path("a.csv"), "{") is FileFormat.CSV
    assert detect_format(Path("a.ndjson"), "u1,D2") is FileFormat.JSONL
    assert detect_format(Path("mapping"), '  {"internal_id"') is FileFormat.JSONL
    assert detect_format(Path("mapping.txt"), "internal_id,domain") is FileFormat.CSV


# ---------------------------------------------------------------------- against PostgreSQL


async def _domains(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES"
        " ('H', 'home', false, 'http://h'), ('D2', 'peer', true, 'http://d2'),"
        " ('D3', 'peer', false, NULL)"
    )


async def _table(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    records = await pool.fetch(
        "SELECT internal_id, domain_id, external_id, is_primary, origin, state FROM id_mappings"
        " ORDER BY internal_id, domain_id, external_id"
    )
    return [tuple(r) for r in records]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


GOOD = (
    "internal_id,domain,external_id,primary\n"
    "u1,D2,p-1,true\n"
    'u1,D3,"x,1",true\n'
    "u1,D2,p-old,false\n"
    "u2,D2,p-2,true\n"
    'g1,D3,"say ""hi""",true\n'
)


@pytest.mark.parametrize("bulk_rows", [BULK_ROWS, 1], ids=["ordinary", "bulk"])
async def test_a_file_with_a_second_primary_a_duplicate_and_a_malformed_line_is_refused_whole(
    pool: asyncpg.Pool, tmp_path: Path, bulk_rows: int
) -> None:
    await _domains(pool)
    file = _write(
        tmp_path / "bad.csv",
        GOOD
        + "u3,D2,p-3,true\n"  # line 7: fine
        + "u1,D2,p-9,true\n"  # line 8: a second primary for u1 in D2
        + "u4,D2,p-2,true\n"  # line 9: p-2 is u2's in D2
        + "u5,D2\n"  # line 10: malformed
        + "u6,NOPE,n-6,true\n"  # line 11: unknown domain
        + "u7,H,h-7,true\n"  # line 12: the home domain
        + "u8,D3,u2,true\n",  # line 13: an external ID that is an internal ID
    )
    # The bulk path (a large file into an empty table) names the same lines.
    report = await import_mappings(pool, file, actor="test", bulk_rows=bulk_rows)
    assert report.refused
    assert [p.line for p in report.problems] == [8, 9, 10, 11, 12, 13]
    messages = {p.line: p.message for p in report.problems}
    assert "second primary for u1 in D2 (the first is on line 2)" in messages[8]
    assert "external ID p-2 in D2 is also on line 5" in messages[9]
    assert "2 fields, not 4" in messages[10]
    assert "domain NOPE is not known" in messages[11]
    assert "H is the home domain" in messages[12]
    assert "external ID u2 is an internal ID" in messages[13]
    assert report.problem_count == 6 and report.rows == 0
    assert await _table(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM entities") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_past_the_limit_bad_lines_are_counted_not_named(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _domains(pool)
    lines = [f"u{i},D2,same,true\n" if i % 2 else f"u{i},D2\n" for i in range(1, 301)]
    file = _write(tmp_path / "many.csv", "".join(lines))
    report = await import_mappings(pool, file, actor="test", limit=10, batch=7)
    # 150 malformed lines and 149 duplicates of line 1's external ID; the first 10 by line.
    assert report.problem_count == 299
    assert [p.line for p in report.problems] == list(range(2, 12))
    assert await _table(pool) == []


@pytest.mark.parametrize("file_format", list(FileFormat))
async def test_a_good_file_loads_and_exports_back_byte_for_byte(
    pool: asyncpg.Pool, tmp_path: Path, file_format: FileFormat
) -> None:
    await _domains(pool)
    rows = [
        ("u1", "D2", "p-1", True),
        ("u1", "D3", "x,1", True),
        ("u1", "D2", "p-old", False),
        ("u2", "D2", "p-2", True),
        ("g1", "D3", 'say "hi" \u2013 ünï', True),
    ] + [(f"n{i}", "D3", f"m{i}", True) for i in range(200)]
    text = format_header(file_format) + "".join(format_row(file_format, *r) for r in rows)
    file = _write(tmp_path / f"good.{file_format.value}", text)
    report = await import_mappings(pool, file, actor="cli:test", batch=50)
    assert not report.refused, report.problems
    assert (report.rows, report.entities, report.lines) == (205, 203, len(text.splitlines()))
    table = await _table(pool)
    assert ("u1", "D2", "p-1", True, "peer", "active") in table  # a push peer assigned it
    assert ("u1", "D2", "p-old", False, "peer", "retired") in table  # an alias, kept
    assert ("u1", "D3", "x,1", True, "minted", "active") in table
    handles = await pool.fetch("SELECT correlation_handle FROM id_mappings")
    assert len({h[0] for h in handles}) == 205 and all(len(h[0]) == 22 for h in handles)
    audit = await pool.fetchrow("SELECT actor, action, details FROM audit_log")
    assert (audit["actor"], audit["action"]) == ("cli:test", "mappings_import")
    assert audit["details"]["rows"] == 205

    out = io.StringIO()
    assert await export_mappings(pool, out, file_format=file_format) == 205
    assert sorted(out.getvalue().splitlines()) == sorted(text.splitlines())
    only = io.StringIO()
    assert await export_mappings(pool, only, domain="D2", file_format=file_format) == 3


async def _definitions(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    """Every index, constraint and trigger of id_mappings, as the catalog defines it."""
    records = await pool.fetch(
        "SELECT 'index', indexname, indexdef FROM pg_indexes WHERE tablename = 'id_mappings'"
        " UNION ALL SELECT 'constraint', conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'id_mappings'::regclass"
        " UNION ALL SELECT 'trigger', tgname, pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE tgrelid = 'id_mappings'::regclass AND NOT tgisinternal ORDER BY 1, 2"
    )
    return [tuple(r) for r in records]


async def test_a_large_import_into_an_empty_table_builds_every_index_and_key_again(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _domains(pool)
    definitions = await _definitions(pool)
    assert len(definitions) > 8  # the primary key, unique keys, foreign keys, indexes, trigger
    file = _write(tmp_path / "good.csv", GOOD)
    report = await import_mappings(pool, file, actor="test", bulk_rows=5)
    assert not report.refused, report.problems
    assert (report.rows, report.bulk) == (5, True)
    # The rows went straight into the table while the file was read: no step of their own.
    assert sorted(report.write_steps) == ["entities", "indexes"]
    assert await _definitions(pool) == definitions
    assert len(await _table(pool)) == 5
    assert await pool.fetchval("SELECT details -> 'bulk' FROM audit_log") is True
    # The keys are back and enforce: a second primary, an unknown entity, a duplicate.
    store = MappingStore(pool)
    with pytest.raises(ConflictError):
        await store.add_mapping("u1", "D2", "p-again")
    with pytest.raises(NotFoundError):
        await store.add_mapping("nobody", "D2", "p-x")
    # The table is not empty now: the next large file is inserted the ordinary way.
    more = _write(tmp_path / "more.csv", "".join(f"v{i},D3,w{i},true\n" for i in range(6)))
    again = await import_mappings(pool, more, actor="test", bulk_rows=5)
    assert (again.rows, again.bulk) == (6, False)
    assert sorted(again.write_steps) == ["entities", "rows"]
    assert await _definitions(pool) == definitions


async def test_a_refused_large_import_leaves_the_table_and_its_definition(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _domains(pool)
    definitions = await _definitions(pool)
    # Only duplicates: the bulk path leaves them to its unique index builds, which fail, and
    # then names them.
    file = _write(
        tmp_path / "bad.csv",
        GOOD
        + "u2,D2,p-3,true\n"  # line 7: a second primary
        + "u9,D2,p-1,true\n",  # line 8: p-1 is u1's in D2
    )
    report = await import_mappings(pool, file, actor="test", bulk_rows=1)
    assert report.refused and not report.bulk and report.rows == 0
    assert [p.line for p in report.problems] == [7, 8] and report.problem_count == 2
    assert "a second primary for u2 in D2 (the first is on line 5)" in report.problems[0].message
    assert "external ID p-1 in D2 is also on line 2" in report.problems[1].message
    assert await pool.fetchval("SELECT count(*) FROM entities") == 0
    assert await _definitions(pool) == definitions
    assert await _table(pool) == []


async def test_rows_that_clash_with_the_table_are_refused(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _domains(pool)
    store = MappingStore(pool)
    await store.register_entities({"u1": "User", "u2": "User", "u3": "User"})
    await store.add_mapping("u1", "D2", "p-1")
    await store.add_mapping("u2", "D2", "p-2")
    await store.merge("u2", ["u3"], idempotency_key="k", actor="test")
    before = await _table(pool)
    file = _write(
        tmp_path / "clash.csv",
        "u9,D2,p-1,true\n"  # p-1 is u1's already
        "u1,D2,p-10,true\n"  # u1 has a primary in D2 already
        "u1,D2,p-11,false\n"  # fine: an alias
        "u3,D3,q-3,true\n"  # u3 was merged into u2
        "u4,D3,q-4,true\n",  # fine
    )
    report = await import_mappings(pool, file, actor="test")
    messages = {p.line: p.message for p in report.problems}
    assert sorted(messages) == [1, 2, 4]
    assert "external ID p-1 in D2 is already in the mapping table" in messages[1]
    assert "u1 already has a primary ID in D2" in messages[2]
    assert "u3 was merged into u2: map u2 instead" in messages[4]
    assert await _table(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM entities WHERE internal_id = 'u4'") == 0


async def test_an_import_sends_no_notification_and_leaves_every_cache_true(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    await _domains(pool)
    store = MappingStore(pool)
    await store.register_entities({"u1": "User"})
    heard: list[str] = []
    listener = await asyncpg.connect(db_url)
    cache = MappingCache()
    try:
        await listener.add_listener("broker_mappings", lambda *a: heard.append(a[3]))
        async with listen(db_url, cache):
            await until(lambda: cache.enabled, "the cache listens")
            cached = MappingStore(pool, cache=cache)
            assert await cached.resolve_outbound("D2", {"u1": "User"}, mint=False) == {}
            assert await cached.resolve_inbound("D2", ["p-1"]) == {}
            lines = "".join(f"n{i},D3,m{i},true\n" for i in range(1000))
            file = _write(tmp_path / "m.csv", "u1,D2,p-1,true\n" + lines)
            assert (await import_mappings(pool, file, actor="test")).rows == 1001
            assert await cached.resolve_outbound("D2", {"u1": "User"}, mint=False) == {"u1": "p-1"}
            assert await cached.resolve_inbound("D2", ["p-1"]) == {"p-1": "u1"}
            # A notification sent after the import would arrive before this one.
            await pool.execute("SELECT pg_notify('broker_mappings', 'marker')")
            await until(lambda: "marker" in heard, "the marker arrives")
        assert heard == ["marker"]
    finally:
        await listener.close()


# ---------------------------------------------------------------------- the command


def _broker(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"BROKER_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


async def test_the_command_names_each_bad_line_and_exports_what_it_imported(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    await _domains(pool)
    bad = _write(tmp_path / "bad.csv", GOOD + "u1,D2,p-9,true\nu5,D2\n")
    refused = _broker(db_url, "mappings", "import", str(bad))
    assert refused.returncode == 1, refused.stderr
    assert f"{bad}:7: a second primary for u1 in D2" in refused.stderr
    assert f"{bad}:8: 2 fields" in refused.stderr
    assert "2 bad lines" in refused.stderr and "nothing was imported" in refused.stderr
    assert await _table(pool) == []

    good = _write(tmp_path / "good.csv", GOOD)
    loaded = _broker(db_url, "mappings", "import", str(good))
    assert loaded.returncode == 0, loaded.stderr
    assert "imported 5 mapping rows (3 new entities)" in loaded.stdout
    out = tmp_path / "out.csv"
    exported = _broker(db_url, "mappings", "export", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert sorted(out.read_text(encoding="utf-8").splitlines()) == sorted(GOOD.splitlines())
    unknown = _broker(db_url, "mappings", "export", "--domain", "NOPE")
    assert unknown.returncode == 1 and "there is no domain NOPE" in unknown.stderr


async def test_the_checks_run_no_subplan_per_staged_line(pool: asyncpg.Pool) -> None:
    """Every check is a join: no subplan is run per staged line. An OR of two EXISTS was one, and
    at 10M lines, once its hashed form no longer fit work_mem, it scanned the staging table once
    per line (the check never finished)."""
    await _domains(pool)
    async with pool.acquire() as conn, conn.transaction():
        await accounts.begin_import(conn)
        await accounts.stage_import(conn, [[Record(1, "u1", "D2", "p-1", True)]])
        await conn.execute(query("import_analyze"))
        checks = [("import_problems", 100, False), ("import_duplicates", 100)]
        for name, *args in checks:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query(name), *args))
            assert "SubPlan" not in plan, plan
            assert "mapping_import" in plan


def test_an_import_asks_for_memory_in_proportion_to_the_machine() -> None:
    small, large = accounts.import_memory(2 << 30), accounts.import_memory(64 << 30)
    assert small == {"work_mem": "64MB", "maintenance_work_mem": "256MB", "temp_buffers": "256MB"}
    assert large == {
        "work_mem": "1024MB",
        "maintenance_work_mem": "2048MB",
        "temp_buffers": "3072MB",
    }
    assert accounts.import_memory(0)["temp_buffers"] == "64MB"  # memory unknown: the floor


async def test_the_bulk_path_writes_the_rows_without_the_write_ahead_log(
    db_url: str, tmp_path: Path
) -> None:
    # The embedded server runs wal_level = minimal; the bulk path truncates the empty table in its
    # transaction, so its rows and index builds go to new files, synced at commit, not to the WAL.
    # (Files under wal_skip_threshold, 2 MB, are WAL-logged whole at commit instead: 0 here, so
    # that this small file shows what a large one does.)
    pool = await create_pool(db_url, settings={"wal_skip_threshold": "0"})
    try:
        if await pool.fetchval("SHOW wal_level") != "minimal":
            pytest.skip(
                "the test server does not run wal_level = minimal (BROKER_TEST_DATABASE_URL)"
            )
        await _domains(pool)
        lines = "".join(
            f"e{i:05d},D2,x{i:05d},true\ne{i:05d},D3,y{i:05d},true\n" for i in range(20_000)
        )
        file = _write(tmp_path / "big.csv", lines)
        before = await pool.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        report = await import_mappings(pool, file, actor="test", bulk_rows=1_000)
        assert (report.rows, report.bulk) == (40_000, True), report.problems
        wal = await pool.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", before
        )
        table = await pool.fetchval("SELECT pg_total_relation_size('id_mappings')")
    finally:
        await pool.close()
    # The 20,000 new entities are WAL-logged (that table is not empty); the 40,000 mapping rows
    # and their indexes are not: the WAL is a fraction of what they take.
    assert wal < table / 2, (wal, table)


def test_the_bulk_path_turns_row_numbers_back_into_line_numbers() -> None:
    # Rows 1..6 came from lines 2-3, 5, 9-11 (a blank line 4, a bad record on lines 6-8).
    lines = RowLines()
    lines.add([Record(n, "u", "D2", f"x{n}", True) for n in (2, 3, 5)])
    lines.add([Record(n, "u", "D2", f"x{n}", True) for n in (9, 10, 11)])
    assert [lines.line(row) for row in range(1, 7)] == [2, 3, 5, 9, 10, 11]
    found = ([LineProblem(4, "a"), LineProblem(6, "b")], 2)
    assert lines.lines(found) == ([LineProblem(9, "a"), LineProblem(11, "b")], 2)
