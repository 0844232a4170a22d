"""Wiring: the aiohttp application, its resources with a lifetime, and the health endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker import __version__
from broker.admin.api import Admin, create_admin_app
from broker.config import Config, ConfigError, PropagationConfig
from broker.console import register_console
from broker.credentials import reserved_secrets
from broker.db import create_pool, listening, migrated_pool, migration_status, query
from broker.domains import Domain, DomainStore, stored_url_problems
from broker.errors import BrokerError
from broker.events.keyring import KeyRing
from broker.events.purge import EventRetention, purging
from broker.events.render import EventRenderer
from broker.events.web import EventWaiters, Poll, jwks_handler
from broker.home import HomeClient
from broker.logs import access_log
from broker.logsafe import protect_loggers
from broker.mapping.cache import MappingCache, listen
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.propagation.delivery import worker_pool_size
from broker.propagation.journal import Journal
from broker.propagation.policy import Backoff
from broker.propagation.poller import HomePoller
from broker.propagation.receiver import HomeReceiver
from broker.propagation.worker import Deliverer, WorkerSettings
from broker.proxy.handlers import Proxy, route_refusal
from broker.proxy.routes import routes
from broker.reconcile.initial import InitialSync
from broker.reconcile.runner import Reconciler
from broker.reconcile.session import make_reconciler
from broker.responses import MAX_BODY, SCIM_PREFIX, answer_errors
from broker.scim.guard import IdShape
from broker.scim.versions import VersionSealer
from broker.secrets import SecretBox, check_key, key_source, load_box
from broker.tokens import TokenStore

__all__ = [
    "ADMIN_URL",
    "CONFIG",
    "DELIVERER",
    "GUARD",
    "HOME",
    "METRICS",
    "POOL",
    "PROXY",
    "SEALER",
    "STORE",
    "ListenError",
    "Metrics",
    "create_app",
]


class ListenError(OSError):
    """A listener that could not bind: which address, and the setting that chooses it."""

    def __init__(self, host: str, port: int, setting: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.host, self.port, self.setting = host, port, setting


log = logging.getLogger(__name__)


class Metrics:
    """The Prometheus metrics of one application (a registry of its own, so tests can run many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_http_requests",
            "HTTP requests served, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_http_request_duration_seconds",
            "Time to serve an HTTP request, by route.",
            ["route"],
            registry=self.registry,
        )
        self.pool_size = Gauge(
            "broker_db_pool_connections",
            "Connections in the database pool, by state.",
            ["state"],
            registry=self.registry,
        )
        self.leaks = Counter(
            "broker_leak_guard_blocks",
            "Domain-bound responses the leak guard withheld, by domain.",
            ["domain"],
            registry=self.registry,
        )
        self._propagation_metrics()
        self.info = Gauge(
            "broker_build_info", "The broker's version.", ["version"], registry=self.registry
        )
        self.info.labels(__version__).set(1)
        # Each (route, method, status)'s counter and each route's histogram, looked up once:
        # ``labels()`` takes a lock and builds its key on every call (issue 15).
        self._served: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def served(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request served: counted by route, method and status, timed by route."""
        key = (route, method, status)
        children = self._served.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
            )
            if len(self._served) < 4096:  # methods and statuses are few; never unbounded
                self._served[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def _propagation_metrics(self) -> None:
        """The outbox, the push peers and the SETs waiting for domains."""
        self.deliveries = Counter(
            "broker_deliveries",
            "Delivery attempts to push peers, by peer and outcome (done, retry, dead, waiting, error).",
            ["domain", "outcome"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "broker_outbox_depth",
            "Deliveries waiting or in flight, by peer.",
            ["domain"],
            registry=self.registry,
        )
        self.queue_age = Gauge(
            "broker_outbox_oldest_age_seconds",
            "Age of the oldest delivery waiting, by peer.",
            ["domain"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "broker_outbox_dead_letters",
            "Dead-lettered deliveries waiting for a person, by peer.",
            ["domain"],
            registry=self.registry,
        )
        self.quarantined = Gauge(
            "broker_peer_quarantined",
            "1 while a peer is quarantined.",
            ["domain"],
            registry=self.registry,
        )
        self.initial_sync = Gauge(
            "broker_initial_sync_entities",
            "A push domain's initial sync: entities to bring over (wanted), and in the peer now "
            "(arrived).",
            ["domain", "count"],
            registry=self.registry,
        )
        self.security_events = Gauge(
            "broker_security_events",
            "SETs waiting for each domain: pending (not yet sent), sent (not acknowledged).",
            ["domain", "state"],
            registry=self.registry,
        )


CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
DB_URL = web.AppKey("db_url", str)
HOME = web.AppKey("home", HomeClient)
DELIVERER = web.AppKey("deliverer", Deliverer)
ADMIN_URL = web.AppKey("admin_url", str)
ADMIN = web.AppKey("admin", Admin)
STORE = web.AppKey("store", MappingStore)
GUARD = web.AppKey("guard", LeakGuard)
"""The leak guard, for everything bound to a domain or a peer (its exact lookup shares the
store's cache)."""
BOX: web.AppKey[Callable[[], SecretBox]] = web.AppKey("box")
JOURNAL = web.AppKey("journal", Journal)
"""The write journal: every write home took, recorded with what it implies."""
PROXY = web.AppKey("proxy", Proxy)
KEYS = web.AppKey("keys", KeyRing)
RENDERER = web.AppKey("renderer", EventRenderer)
WAITERS = web.AppKey("waiters", EventWaiters)
#: Home's versions sealed per domain and resource (broker/scim/versions.py), under a subkey of
#: the outbox key.
SEALER = web.AppKey("sealer", VersionSealer)

METRICS = web.AppKey("metrics", Metrics)


async def _database(app: web.Application) -> AsyncIterator[None]:
    """The database: the configured server or the embedded one, migrated, behind a pool."""
    config = app[CONFIG].database
    async with migrated_pool(
        config.url, config.data_dir, min_size=config.pool_min_size, max_size=config.pool_max_size
    ) as (pool, url):
        app[POOL] = pool
        app[DB_URL] = url
        cache = MappingCache(config.cache_entries)
        propagation = app[CONFIG].propagation
        key = load_box(
            propagation.secret_key_env,
            config.data_dir,
            key_file=propagation.secret_key_file,
            database_url=config.url,
        )
        # A missing key, or one that is not this database's, is found here, at start-up.
        await check_key(
            pool,
            key,
            key_source(propagation.secret_key_env, propagation.secret_key_file, config.data_dir),
        )

        def box() -> SecretBox:
            return key

        app[BOX] = box
        app[SEALER] = VersionSealer(lambda: box().derive("version seal", 64))
        app[STORE] = MappingStore(pool, cache=cache)
        app[JOURNAL] = Journal(pool, box)
        app[GUARD] = LeakGuard(app[STORE], IdShape(app[CONFIG].home.id_pattern))
        app[KEYS] = KeyRing(pool, box, refresh=app[CONFIG].events.key_refresh)
        if config.cache_entries > 0:
            async with listen(url, cache):
                yield
        else:
            yield


async def _outbound_urls(app: web.Application) -> AsyncIterator[None]:
    """The broker does not start with a stored address it would refuse on the way in (a peer's
    SCIM URL, a SET receiver): ConfigError naming the domain and the fix."""
    problems = await stored_url_problems(app[POOL])
    if problems:
        raise ConfigError(
            "addresses the broker will not call are stored:\n  " + "\n  ".join(problems)
        )
    yield


@web.middleware
async def _measure(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Inside the access log, around everything else, in one middleware (each layer costs a
    call per request, issue 15): the metrics, counting the status the client got, errors
    answered included; under /scim/v2 the route guard (step 1, ``route_refusal``) and every
    failure answered as a SCIM error (``answer_errors``), in that order."""
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    started = time.perf_counter()
    status = 500  # what aiohttp answers for an exception nothing turned into a response
    try:
        if request.path.startswith(SCIM_PREFIX):
            response = await answer_errors(request, handler, before=route_refusal)
        else:
            refusal = route_refusal(request)
            response = refusal if refusal is not None else await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BrokerError as exc:  # outside /scim/v2, where no middleware answers it
        status = exc.status
        raise
    finally:
        request.app[METRICS].served(route, request.method, status, time.perf_counter() - started)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.json_response({"status": "ok"})


class HomeReadiness:
    """Home's answer to ``/readyz``'s question, asked at most every ``ttl`` seconds (a probe
    that polls often does not load home)."""

    def __init__(self, ttl: float = 5.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.monotonic = monotonic
        self._last: tuple[float, str | None] | None = None

    async def problem(self, home: HomeClient) -> str | None:
        now = self.monotonic()
        if self._last is not None and now - self._last[0] < self.ttl:
            return self._last[1]
        problem = await home.reachable()
        self._last = (now, problem)
        return problem


READINESS = web.AppKey("readiness", HomeReadiness)


async def readyz(request: web.Request) -> web.Response:
    """Readiness, with each check's status in the body: the database answers and every
    migration this broker knows is applied; home serves SCIM with the broker's token (when a
    home is configured). 503 while any fails; ``/healthz`` stays up meanwhile."""
    checks = {"database": await _database_check(request.app)}
    if HOME in request.app:
        problem = await request.app[READINESS].problem(request.app[HOME])
        checks["home"] = (
            {"status": "ok"} if problem is None else {"status": "failing", "reason": problem}
        )
    ready = all(check["status"] == "ok" for check in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if not ready:
        body["reason"] = "; ".join(
            f"{name}: {check['reason']}" for name, check in checks.items() if "reason" in check
        )
        log.warning("not ready: %s", body["reason"])
    return web.json_response(body, status=200 if ready else 503)


async def _database_check(app: web.Application) -> dict[str, Any]:
    try:
        async with app[POOL].acquire(timeout=2) as conn:
            status = await migration_status(conn)
    except Exception as exc:  # any failure means "not ready"; say which
        return {"status": "failing", "reason": f"the database does not answer: {exc}"}
    if status.pending:
        names = ", ".join(m.name for m in status.pending)
        return {"status": "failing", "reason": f"migrations not applied: {names}"}
    return {"status": "ok", "migrations": status.applied}


async def metrics(app: web.Application, request: web.Request) -> web.Response:
    """Prometheus metrics of ``app`` (the main application), served on the admin listener."""
    app_metrics = app[METRICS]
    pool = app[POOL]
    app_metrics.pool_size.labels("idle").set(pool.get_idle_size())
    app_metrics.pool_size.labels("total").set(pool.get_size())
    for record in await pool.fetch(query("all_queue_stats")):
        app_metrics.queue_depth.labels(record["id"]).set(record["depth"])
        app_metrics.queue_age.labels(record["id"]).set(float(record["oldest_age_seconds"]))
        app_metrics.dead_letters.labels(record["id"]).set(record["dead"])
        app_metrics.quarantined.labels(record["id"]).set(1 if record["quarantined"] else 0)
    for record in await pool.fetch(query("initial_sync_progress"), None):
        app_metrics.initial_sync.labels(record["id"], "wanted").set(record["wanted"])
        app_metrics.initial_sync.labels(record["id"], "arrived").set(record["arrived"])
    app_metrics.security_events.clear()  # a state with nothing left in it reads 0, not stale
    for record in await pool.fetch(query("unsettled_event_stats")):
        app_metrics.security_events.labels(record["domain_id"], record["state"]).set(
            record["events"]
        )
    body = generate_latest(app_metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _home(app: web.Application) -> AsyncIterator[None]:
    """One client toward home for the whole process, for the proxy and the workers."""
    config = app[CONFIG]
    assert config.home.scim_url is not None
    app[HOME] = home = HomeClient(
        config.home.scim_url,
        config.home.bearer_token(),
        timeout=config.home.timeout,
        limit=config.home.max_answer_bytes,
    )
    try:
        yield
    finally:
        await home.close()


async def _proxy(app: web.Application) -> AsyncIterator[None]:
    """The domain-facing SCIM endpoint."""
    pool = app[POOL]

    async def audit(actor: str, action: str, details: dict[str, Any]) -> None:
        await pool.execute(query("audit"), actor, action, None, details)

    app[PROXY].configure(
        store=app[STORE],
        domains=DomainStore(pool),
        tokens=TokenStore(pool),
        home=app[HOME],
        guard=app[GUARD],
        sealer=app[SEALER],
        journal=app[JOURNAL],
        audit=audit,
        on_leak=lambda domain: app[METRICS].leaks.labels(domain).inc(),
    )
    config = app[CONFIG]
    app[RENDERER] = EventRenderer(
        pool,
        app[STORE],
        app[HOME],
        app[KEYS],
        issuer=config.public_url,
        scim_base=app[PROXY].base,
        id_pattern=config.home.id_pattern,
        guard=app[GUARD],
        sealer=app[SEALER],
        txn_key=functools.cache(lambda: app[BOX]().derive("set txn")),
    )
    yield


POLL = web.AppKey("poll", Poll)


async def _domain_changes(app: web.Application) -> AsyncIterator[None]:
    """Every process drops what it cached of a domain (its settings, its tokens' verdicts, the
    delivery worker's list of push peers) as soon as the domain changes, in whichever process
    (channel ``broker_domains``, migration 0012): a disabled domain is refused at once, and a
    narrowed scope holds for the next claim, not after the caches' few seconds."""

    def changed(domain: str) -> None:
        if PROXY in app:
            app[PROXY].domains.forget(domain)
            app[PROXY].tokens.forget(domain)
        if POLL in app:
            app[POLL].forget(domain)
        if ADMIN in app:  # the admin API, the console's dead letters, home's pushed SETs
            app[ADMIN].domains.forget(domain)
            app[ADMIN].tokens.forget(domain)
        if DELIVERER in app:  # the push peers' settings (scope, read list) read at the next claim
            app[DELIVERER].claims.forget_peers()

    def lost() -> None:  # while nothing listens, a change may go unseen: drop everything
        changed("")

    async with listening(app[DB_URL], "broker_domains", changed, on_up=lost, on_down=lost):
        yield


async def _events(app: web.Application) -> AsyncIterator[None]:
    """Long polls woken as soon as a domain has a new SET."""
    async with app[WAITERS].listen(app[DB_URL]):
        yield


async def _event_purge(app: web.Application) -> AsyncIterator[None]:
    """Settled SETs and the home changes no SET names, purged after their retention."""
    events = app[CONFIG].events
    retention = EventRetention(events.acknowledged_retention, events.changes_retention)
    task = asyncio.create_task(
        purging(app[POOL], retention, events.purge_interval), name="SET purge"
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _propagation(app: web.Application) -> AsyncIterator[None]:
    """Delivery to push peers, and the poller that finds changes made in home directly."""
    config = app[CONFIG].propagation
    timeout = aiohttp.ClientTimeout(total=config.peer_timeout)
    # The workers' commits do not wait for the WAL flush: all they write can be replayed (a
    # lost "done" or copy is repaired by the state-based sync, a lost create by the handle
    # lookup, a lost enqueue by the home poller), and the flush was most of a delivery's
    # database time. Writes that answer a domain keep theirs (the main pool).
    pool = await create_pool(
        app[DB_URL],
        min_size=1,
        max_size=worker_pool_size(config.concurrency),
        settings={"synchronous_commit": "off"},
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        metrics = app[METRICS]
        deliverer = Deliverer(
            pool,
            app[HOME],
            session,
            id_pattern=app[CONFIG].home.id_pattern,
            box=app[BOX],
            settings=WorkerSettings(
                concurrency=config.concurrency,
                lease=config.lease,
                backoff=Backoff(
                    config.backoff_base, config.backoff_ceiling, config.quarantine_retry
                ),
                quarantine_after=config.quarantine_after,
                retention=config.retention,
                done_retention=config.done_retention,
                history_retention=config.history_retention,
                conflict_patience=config.conflict_patience,
                max_answer=config.peer_max_answer_bytes,
                bulk=config.bulk_operations,
            ),
            observe=lambda peer, outcome: metrics.deliveries.labels(peer, outcome).inc(),
            events=lambda: app[RENDERER],
            guard=app[GUARD],
        )
        app[DELIVERER] = deliverer
        tasks = [asyncio.create_task(deliverer.run(app[DB_URL]), name="deliveries")]
        if config.home_poll_interval > 0:
            poller = HomePoller(
                app[POOL],
                app[HOME],
                interval=config.home_poll_interval,
                sweep_interval=config.sweep_interval,
                deletion_threshold=config.deletion_threshold,
            )
            tasks.append(asyncio.create_task(poller.run(), name="home poller"))
        if config.initial_sync:
            initial = InitialSync(app[POOL], app[HOME], session, config)
            tasks.append(asyncio.create_task(initial.run(), name="initial sync"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _admin(app: web.Application) -> AsyncIterator[None]:
    """The admin listener, on its own address, for as long as the main application runs."""
    server = app[CONFIG].server
    admin = Admin(app[POOL], app[STORE], app.get(HOME), app[JOURNAL])
    app[ADMIN] = admin
    events = app[CONFIG].events
    async with contextlib.AsyncExitStack() as stack:
        receiver = None
        if events.home_jwks_url and HOME in app:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            )
            receiver = HomeReceiver(
                app[POOL],
                admin.tokens,
                app[HOME],
                session,
                jwks_url=events.home_jwks_url,
                issuer=events.home_issuer,
            )
        reconcilers = None
        if HOME in app:
            peers = await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=app[CONFIG].propagation.peer_timeout)
                )
            )
            reconcilers = functools.partial(
                _reconciler, app[POOL], app[HOME], peers, app[CONFIG].propagation
            )
        admin_app = create_admin_app(
            admin,
            receiver,
            metrics=functools.partial(metrics, app),
            reserved=reserved_secrets(app[CONFIG]),
            reconcilers=reconcilers,
        )
        register_console(
            admin_app,
            app[POOL],
            app[STORE],
            app.get(HOME),
            secure=app[CONFIG].public_url.startswith("https:"),
            reserved=reserved_secrets(app[CONFIG]),
            reconcilers=reconcilers,
        )
        admin_app.middlewares.insert(0, access_log)  # its lines carry correlation IDs too
        runner = web.AppRunner(admin_app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, server.admin_host, server.admin_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(server.admin_host, server.admin_port, "admin_port", exc) from exc
        app[ADMIN_URL] = f"http://{server.admin_host}:{server.admin_port}"
        try:
            yield
        finally:
            await runner.cleanup()


def _reconciler(
    pool: asyncpg.Pool,
    home: HomeClient,
    session: aiohttp.ClientSession,
    settings: PropagationConfig,
    domain: Domain,
    progress: Callable[[str], None],
) -> Reconciler:
    """A reconciler of ``domain`` for the admin API, with the serving broker's clients."""
    return make_reconciler(pool, home, session, domain, settings, progress=progress)


def create_app(config: Config) -> web.Application:
    """The broker's application; production and tests build the same one."""
    # The access log is outermost; _measure holds the metrics, the SCIM errors and the route
    # guard, so that it counts the response made of an error, not the exception.
    protect_loggers()  # aiohttp logs a malformed request with its bytes: never a token
    app = web.Application(
        middlewares=[access_log, _measure],
        client_max_size=MAX_BODY,
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[READINESS] = HomeReadiness()
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_outbound_urls)
    if config.home.scim_url is not None:
        proxy = Proxy(public_base=config.public_url, id_pattern=config.home.id_pattern)
        app[PROXY] = proxy
        app.cleanup_ctx.append(_home)
        app.cleanup_ctx.append(_proxy)
        app.router.add_routes(routes(proxy))
        app[WAITERS] = EventWaiters()
        app.cleanup_ctx.append(_events)
        app.cleanup_ctx.append(_event_purge)
        poll = Poll(
            lambda: app[POOL],
            lambda: app[RENDERER],
            app[WAITERS],
            long_poll_max=config.events.long_poll_max,
            max_events=config.events.max_events,
        )
        app[POLL] = poll
        app.router.add_post("/events/poll", poll.handle)
        app.cleanup_ctx.append(_domain_changes)
        if config.propagation.enabled:
            app.cleanup_ctx.append(_propagation)
    app.router.add_get("/.well-known/jwks.json", jwks_handler(lambda: app[KEYS]))
    if config.server.admin_port:
        app.cleanup_ctx.append(_admin)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # /metrics names every domain and its queues: it is on the admin listener only (_admin).
    return app
