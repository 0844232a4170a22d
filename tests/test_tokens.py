"""Domain bearer tokens: only a hash is stored; revoked, expired and unknown tokens are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from broker.db import apply_migrations, load_migrations
from broker.errors import InvalidValueError, NotFoundError
from broker.tokens import (
    AuthenticationError,
    ForbiddenError,
    TokenStore,
    hash_token,
    parse_duration,
)


@pytest.fixture
async def tokens(pool: asyncpg.Pool) -> TokenStore:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D1', 'peer')")
    return TokenStore(pool, cache_seconds=0)


async def test_a_token_is_stored_only_as_a_hash_and_authenticates_its_domain(
    tokens: TokenStore, pool: asyncpg.Pool
) -> None:
    token, info = await tokens.issue("D1", scopes=["scim:read"])
    stored = await pool.fetchrow("SELECT * FROM domain_tokens")
    assert token not in str(dict(stored))
    assert stored["token_hash"] == hash_token(token)
    principal = await tokens.authenticate(f"Bearer {token}")
    assert principal.domain_id == "D1" and principal.scopes == {"scim:read"}
    principal.require("scim:read")
    with pytest.raises(ForbiddenError, match="lacks the scim:write scope"):
        principal.require("scim:write")
    assert (await tokens.list("D1"))[0].last_used_at is not None
    assert info.prefix == token[: len(info.prefix)]


async def test_revoked_expired_unknown_and_malformed_tokens_are_refused(tokens: TokenStore) -> None:
    revoked, info = await tokens.issue("D1")
    await tokens.revoke(info.id)
    expired, _ = await tokens.issue("D1", expires_in=timedelta(seconds=-1))
    cases = {
        f"Bearer {revoked}": "revoked",
        f"Bearer {expired}": "expired",
        "Bearer bkr_nonsense": "not known",
        "Basic dXNlcjpwYXNz": "Bearer TOKEN",
        None: "Bearer TOKEN",
    }
    for header, message in cases.items():
        with pytest.raises(AuthenticationError, match=message) as caught:
            await tokens.authenticate(header)
        assert caught.value.status == 401


async def test_a_token_for_a_disabled_domain_is_refused_as_forbidden_not_unknown(
    tokens: TokenStore, pool: asyncpg.Pool
) -> None:
    token, _ = await tokens.issue("D1")
    await pool.execute("UPDATE domains SET status = 'disabled'")
    with pytest.raises(ForbiddenError, match="disabled") as caught:
        await tokens.authenticate(f"Bearer {token}")
    assert caught.value.status == 403


async def test_issuing_needs_a_known_domain_and_known_scopes(tokens: TokenStore) -> None:
    with pytest.raises(NotFoundError, match="broker domain add D9"):
        await tokens.issue("D9")
    with pytest.raises(InvalidValueError, match="unknown scope scim:admin"):
        await tokens.issue("D1", scopes=["scim:admin"])
    with pytest.raises(NotFoundError):
        await tokens.revoke(12345)


async def test_expiry_follows_the_injected_clock(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D1', 'peer')")
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = TokenStore(pool, cache_seconds=0, clock=lambda: now[0])
    token, _ = await store.issue("D1", expires_in=parse_duration("90d"))
    await store.authenticate(f"Bearer {token}")
    now[0] += timedelta(days=91)
    with pytest.raises(AuthenticationError, match="expired"):
        await store.authenticate(f"Bearer {token}")


async def test_a_cached_verdict_still_expires_with_the_clock(pool: asyncpg.Pool) -> None:
    """The verdict cache (issue 15) keeps the principal, never the expiry's answer."""
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D1', 'peer')")
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = TokenStore(pool, cache_seconds=3600, clock=lambda: now[0])
    token, _ = await store.issue("D1", expires_in=parse_duration("1h"))
    first = await store.authenticate(f"Bearer {token}")
    assert await store.authenticate(f"Bearer {token}") is first  # the cached verdict
    now[0] += timedelta(hours=2)
    with pytest.raises(AuthenticationError, match="expired"):
        await store.authenticate(f"Bearer {token}")


async def test_a_cached_verdict_is_judged_again_once_its_domain_changes(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D1', 'peer')")
    store = TokenStore(pool, cache_seconds=3600)
    token, _ = await store.issue("D1")
    await store.authenticate(f"Bearer {token}")
    await pool.execute("UPDATE domains SET status = 'disabled' WHERE id = 'D1'")
    await store.authenticate(f"Bearer {token}")  # still cached: the change is not told yet
    store.forget("D1")  # what the broker_domains notification does
    with pytest.raises(ForbiddenError, match="disabled"):
        await store.authenticate(f"Bearer {token}")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("2w", 1209600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_a_bad_duration_says_how_to_write_one() -> None:
    with pytest.raises(InvalidValueError, match="for example 90d"):
        parse_duration("ninety days")


# --------------------------------------------------------------------------- the admin scope


async def test_only_the_home_domains_tokens_may_be_issued_the_admin_scope(
    tokens: TokenStore, pool: asyncpg.Pool
) -> None:
    """The admin API shows internal IDs and changes the mapping: a peer or pull domain's token
    never gets it, and the refusal says who may hold it; nothing is stored."""
    with pytest.raises(InvalidValueError, match="only the home domain's tokens hold it"):
        await tokens.issue("D1", scopes=["scim:read", "admin"])
    assert await pool.fetchval("SELECT count(*) FROM domain_tokens") == 0
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('H', 'home')")
    token, info = await tokens.issue("H", scopes=["admin"])
    assert info.scopes == ["admin"]
    (await tokens.authenticate(f"Bearer {token}")).require("admin")


async def test_the_database_refuses_an_admin_scope_on_another_domains_token(
    tokens: TokenStore, pool: asyncpg.Pool
) -> None:
    """Even a write that skips TokenStore.issue (a second writer, a hand-made row)."""
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await pool.execute(
            "INSERT INTO domain_tokens (domain_id, token_hash, prefix, scopes) "
            "VALUES ('D1', 'x', 'bkr_x', ARRAY['admin'])"
        )
    assert caught.value.constraint_name == "domain_tokens_admin_is_home"
    _, info = await tokens.issue("D1")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE domain_tokens SET scopes = scopes || 'admin'::text WHERE id = $1", info.id
        )


async def _legacy_admin_token(pool: asyncpg.Pool, domain: str) -> str:
    """A token of ``domain`` with the admin scope, as one issued before the rule was stored."""
    token = "bkr_legacy-" + domain
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE domain_tokens DISABLE TRIGGER domain_tokens_admin_is_home")
        await conn.execute(
            "INSERT INTO domain_tokens (domain_id, token_hash, prefix, scopes) "
            "VALUES ($1, $2, 'bkr_le', ARRAY['scim:read', 'admin'])",
            domain,
            hash_token(token),
        )
        await conn.execute("ALTER TABLE domain_tokens ENABLE TRIGGER domain_tokens_admin_is_home")
    return token


async def test_an_existing_admin_token_of_a_peer_does_not_authenticate_as_admin(
    tokens: TokenStore, pool: asyncpg.Pool
) -> None:
    token = await _legacy_admin_token(pool, "D1")
    principal = await tokens.authenticate(f"Bearer {token}")
    assert principal.scopes == {"scim:read"}
    with pytest.raises(ForbiddenError, match="operator token"):
        principal.require("admin")


async def test_the_migration_takes_the_admin_scope_from_other_domains_tokens(
    fresh_db: str,
) -> None:
    migrations = load_migrations()
    before = [m for m in migrations if m.version < 11]
    conn = await asyncpg.connect(fresh_db)
    try:
        await apply_migrations(conn, before)
        await conn.execute(
            "INSERT INTO domains (id, kind) VALUES ('H', 'home'), ('P', 'peer'), ('D', 'peer')"
        )
        await conn.execute(
            "INSERT INTO domain_tokens (domain_id, token_hash, prefix, scopes) VALUES "
            "('H', 'h', 'h', ARRAY['admin']), ('P', 'p', 'p', ARRAY['scim:read', 'admin']), "
            "('D', 'd', 'd', ARRAY['admin'])"
        )
        await apply_migrations(conn, migrations)
        rows = {
            r["domain_id"]: (r["scopes"], r["revoked_at"] is not None)
            for r in await conn.fetch("SELECT domain_id, scopes, revoked_at FROM domain_tokens")
        }
    finally:
        await conn.close()
    assert rows == {"H": (["admin"], False), "P": (["scim:read"], False), "D": ([], True)}
