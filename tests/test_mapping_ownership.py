"""One owner of the mapping table: every statement that writes ``id_mappings`` or ``entities`` is
in ``sql/queries/mapping.sql``, and only ``broker/mapping/`` runs them."""

from __future__ import annotations

import re
from pathlib import Path

from broker.db import SQL_DIR, _load_queries

BROKER = Path(__file__).parent.parent / "broker"
WRITES = re.compile(
    r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(id_mappings|entities)\b", re.IGNORECASE
)


def _writers(file: Path) -> set[str]:
    queries = _load_queries_of(file)
    return {name for name, sql in queries.items() if WRITES.search(sql)}


def _load_queries_of(file: Path) -> dict[str, str]:
    everything = _load_queries(SQL_DIR / "queries")
    header = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
    return {n: everything[n] for n in header.findall(file.read_text(encoding="utf-8"))}


def test_only_mapping_sql_writes_the_mapping_table_and_the_entities() -> None:
    for file in sorted((SQL_DIR / "queries").glob("*.sql")):
        if file.name != "mapping.sql":
            assert _writers(file) == set(), f"{file.name} writes the mapping"


def test_only_the_mapping_package_runs_the_statements_that_write_it() -> None:
    writers = _writers(SQL_DIR / "queries" / "mapping.sql")
    assert {"begin_create", "finish_create", "retire_primary", "retire_alias"} <= writers
    called = re.compile(r"""query\(\s*["'](\w+)["']\s*\)""")
    for source in sorted(BROKER.rglob("*.py")):
        if source.parent.name == "mapping":
            continue
        names = set(called.findall(source.read_text(encoding="utf-8")))
        assert names & writers == set(), f"{source.relative_to(BROKER)} writes the mapping"
