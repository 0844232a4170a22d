"""Configuration: a TOML file overlaid with ``BROKER_*`` environment variables, validated by pydantic.

Every key is settable as ``BROKER_SECTION__KEY`` (``BROKER_SERVER__PORT=8081``). Two shortcuts
from the contract also work: ``BROKER_DATABASE_URL`` and ``BROKER_DATA_DIR``. ``BROKER_CONFIG``
names the file when ``--config`` is not given.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from broker.http import outbound_url_problem

__all__ = [
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "EventsConfig",
    "HomeConfig",
    "LogConfig",
    "PropagationConfig",
    "ServerConfig",
    "load_config",
]

ENV_PREFIX = "BROKER_"
# Contract shortcuts (DESIGN section 5, README): env name -> (section, key).
ENV_SHORTCUTS = {
    "BROKER_DATABASE_URL": ("database", "url"),
    "BROKER_DATA_DIR": ("database", "data_dir"),
}
# Variables that carry meaning of their own and are not configuration keys.
ENV_RESERVED = {"BROKER_CONFIG", "BROKER_TEST_DATABASE_URL"}


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data when nothing else is configured."""
    return Path(platformdirs.user_data_dir("scim-id-broker"))


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # The admin API and the home-facing SCIM endpoint listen apart from what domains reach.
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8081, ge=0, le=65535)
    # The base URL domains reach the broker at; Location and meta.location are built on it.
    public_url: str | None = None
    shutdown_timeout: float = Field(default=10.0, gt=0)


class DatabaseConfig(_Section):
    # A PostgreSQL URL; when absent the broker runs an embedded PostgreSQL in data_dir.
    url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    # Mapping answers kept in memory per process (kept true by LISTEN/NOTIFY); 0 turns it off.
    cache_entries: int = Field(default=100_000, ge=0)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError(
                "must be a postgresql:// URL, for example postgresql://user@host/broker"
            )
        return value or None


# UUIDs with or without hyphens: the shape most SCIM services give their IDs.
DEFAULT_ID_PATTERN = (
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)


class HomeConfig(_Section):
    # The home's SCIM base URL, for example https://idm.example.org/scim/v2.
    scim_url: str | None = None
    # The home's bearer token, given directly or (better) by the name of a variable holding it.
    token: SecretStr | None = None
    token_env: str | None = None
    # A regular expression matching the shape of the home's IDs; the leak guard looks for it.
    id_pattern: str = DEFAULT_ID_PATTERN
    timeout: float = Field(default=30.0, gt=0)
    # The longest answer read from home, in bytes (a page of a search, a resource); a longer
    # one is left unread and the request fails (502): raise it, or ask home for smaller pages.
    max_answer_bytes: int = Field(default=16 << 20, ge=65536)

    @field_validator("scim_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = outbound_url_problem(value)
        if problem is not None:
            raise ValueError(f"{problem}, for example https://idm.example.org/scim/v2")
        return value.rstrip("/")

    @field_validator("id_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a regular expression: {exc}") from None
        return value

    def bearer_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The home's token: ``token``, or the variable ``token_env`` names."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_env:
            environ = os.environ if environ is None else environ
            value = environ.get(self.token_env)
            if not value:
                raise ConfigError(
                    f"[home] token_env names {self.token_env}, which is not set: export it, "
                    "or set [home] token"
                )
            return value
        return None


class PropagationConfig(_Section):
    # Deliver to push peers from this process (several processes may share the work).
    enabled: bool = True
    # Requests in flight at each peer, per process (twice as many deliveries get ready).
    concurrency: int = Field(default=4, ge=1, le=256)
    # Seconds a claimed delivery stays claimed; a crashed worker's claims return after it.
    lease: float = Field(default=120.0, gt=0)
    # Retries: exponential backoff from backoff_base to backoff_ceiling seconds, with jitter.
    backoff_base: float = Field(default=1.0, gt=0)
    backoff_ceiling: float = Field(default=60.0, gt=0)
    # A peer failing for this many seconds without a success is quarantined: it is retried every
    # quarantine_retry seconds, one delivery at a time, until it answers again (so a peer back
    # from an outage is found within that many seconds).
    quarantine_after: float = Field(default=300.0, ge=0)
    quarantine_retry: float = Field(default=120.0, gt=0)
    # Seconds a write a peer refuses with 409 (a unique value is taken) is retried before it is
    # a dead letter: the value may be on an account changing hands after a merge or split.
    conflict_patience: float = Field(default=300.0, ge=0)
    # Seconds a peer's retired row is kept, so that late references to it still resolve.
    retention: float = Field(default=30 * 86400.0, ge=0)
    # Seconds a finished delivery (done, cancelled) stays in the outbox before it is purged; the
    # deliveries of a merge or split that is not done stay with it. 0 keeps them for ever.
    done_retention: float = Field(default=7 * 86400.0, ge=0)
    # Seconds each entity's history (`broker history`: writes, deliveries with the peer's answer,
    # SETs, merges and splits) is kept, whatever the outbox purge removed. 0 keeps it for ever.
    history_retention: float = Field(default=30 * 86400.0, ge=0)
    # Seconds between polls of home for changes made there directly (0: no polling), and
    # between sweeps that find resources deleted in home.
    home_poll_interval: float = Field(default=30.0, ge=0)
    sweep_interval: float = Field(default=600.0, gt=0)
    # Timeout of one call to a peer, in seconds.
    peer_timeout: float = Field(default=30.0, gt=0)
    # The longest answer read from a push peer (to one write or read) or a SET receiver, in
    # bytes; a longer one is left unread and the delivery fails (docs/propagation.md).
    peer_max_answer_bytes: int = Field(default=1 << 20, ge=65536)
    # The most writes sent to a push peer in one SCIM Bulk request (RFC 7644 section 3.7), to a
    # peer whose ServiceProviderConfig says it takes Bulk: the writes deliveries send to it at
    # the same time travel together (docs/propagation.md). 0 or 1: one request per write.
    bulk_operations: int = Field(default=32, ge=0, le=1000)
    # Reconciliation and initial sync (docs/reconciliation.md): the most accounts one run may
    # deprovision without `--confirm-deletions N` (unset: 5% of the peer's accounts or 500,
    # whichever is smaller); the peer's accounts read per page and pages a second; whether the
    # serving broker gives a push domain added to it home's entities in its scope.
    deletion_threshold: int | None = Field(default=None, ge=0)
    reconcile_page_size: int = Field(default=100, ge=1, le=1000)
    reconcile_rate: float = Field(default=10.0, ge=0)
    initial_sync: bool = True
    # The variable holding the key that seals write-only values (passwords) waiting in the
    # outbox and the SET signing keys: 32 random bytes, base64url. Unset (and no secret_key_file):
    # outbox.key in the data directory, created on
    # first use, only with the embedded PostgreSQL. Every broker process sharing the database
    # needs the same key: a process with another one refuses to start.
    secret_key_env: str | None = None
    # Or a file holding the key (made there, owner-only, when missing), shared by all processes.
    secret_key_file: Path | None = None


class EventsConfig(_Section):
    """Change notification (Security Event Tokens)."""

    # The longest a poll (RFC 8936) waits for an event before it answers with none, in seconds.
    long_poll_max: float = Field(default=30.0, ge=0, le=600)
    # The most SETs one poll returns, whatever maxEvents asks.
    max_events: int = Field(default=1000, ge=1, le=10_000)
    # Seconds between looks for a key rotated by another process (the newest key signs).
    key_refresh: float = Field(default=10.0, gt=0)
    # Seconds an acknowledged (or skipped) SET is kept before it is purged, and a recorded home
    # change once no SET needs it (the last one of each entity stays: the next change is
    # compared with it). 0 keeps them for ever.
    acknowledged_retention: float = Field(default=7 * 86400.0, ge=0)
    changes_retention: float = Field(default=30 * 86400.0, ge=0)
    # Seconds between purges.
    purge_interval: float = Field(default=600.0, gt=0)
    # The home's JWKS, to check the SETs the home pushes to {admin}/home/events (unset: that
    # receiver is off), and the issuer those SETs must carry (unset: any).
    home_jwks_url: str | None = None
    home_issuer: str | None = None

    @field_validator("home_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = outbound_url_problem(value, query=True)
        if problem is not None:
            raise ValueError(f"{problem}, for example https://idm.example.org/jwks.json")
        return value


class LogConfig(_Section):
    """What ``broker serve`` writes to its standard error (broker/logs.py)."""

    # text: one human line per record; json: one JSON object per line (for a log collector).
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One line per HTTP request (method, path, status, duration, correlation ID), at info.
    access: bool = True

    @field_validator("format", "level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    home: HomeConfig = Field(default_factory=HomeConfig)
    propagation: PropagationConfig = Field(default_factory=PropagationConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def public_url(self) -> str:
        """The base URL for links the broker hands out."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        return f"http://{self.server.host}:{self.server.port}"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    overrides: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        if name in ENV_SHORTCUTS:
            section, key = ENV_SHORTCUTS[name]
        elif "__" in name:
            section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        else:
            raise ConfigError(
                f"environment variable {name} is not a broker setting: use BROKER_SECTION__KEY "
                f"(for example BROKER_SERVER__PORT) or one of {', '.join(sorted(ENV_SHORTCUTS))}"
            )
        overrides.setdefault(section, {})[key] = value
    return overrides


def _describe(error: ValidationError, sources: str) -> str:
    lines = [f"invalid configuration ({sources}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        section, _, rest = key.partition(".")
        env_name = (
            f"{ENV_PREFIX}{section.upper()}__{rest.upper()}" if rest else ENV_PREFIX + key.upper()
        )
        if item["type"] == "extra_forbidden":
            fix = "remove it or check its spelling"
        else:
            fix = item["msg"]
        lines.append(f"  {key} (env {env_name}): {fix}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the TOML file (``path`` or ``$BROKER_CONFIG``, optional) and overlay the environment."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("BROKER_CONFIG")
    data: dict[str, Any] = {}
    sources = []
    if path:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {file} is not valid TOML: {exc}") from None
        sources.append(str(file))
    overrides = _env_overrides(environ)
    if overrides:
        sources.append("environment")
    for section, values in overrides.items():
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"[{section}] in the configuration file must be a table")
        current.update(values)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, " and ".join(sources) or "defaults")) from None
