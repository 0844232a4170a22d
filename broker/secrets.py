"""Write-only attribute values (``returned: never``, such as ``password``) on their way to peers.

Home never returns them, so a password set through the broker is delivered from the write itself
(RFC 7642 section 2.3.6). Between the write and the delivery it waits in the outbox sealed with
AES-256-GCM, under a key kept outside the database: an operator's environment variable
(``[propagation] secret_key_env``), a key file (``[propagation] secret_key_file``, made on first
use when missing), or, with the embedded PostgreSQL only, ``outbox.key`` in the data directory
(made on first use). All files are readable by their owner only. Several broker processes sharing
one database must share the key: its fingerprint (an HMAC-SHA256 subkey, never the key) is
recorded in the database by the first process, and a process with another key refuses to start
(:func:`check_key`). Values are never logged.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.config import ConfigError
from broker.db import query

__all__ = ["SealError", "SecretBox", "check_key", "key_source", "load_box"]

_NONCE = 12
_AAD = b"scim-id-broker outbox v1"


class SealError(Exception):
    """Sealed values that this broker's key cannot open."""


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError(
                "the outbox key must be 32 random bytes, base64url-encoded (43 characters)"
            )
        self._aead = AESGCM(key)
        self._key = key

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """A subkey of this key for one ``purpose`` (HKDF-SHA256, RFC 5869): the outbox key
        itself is never used for anything but the outbox."""
        info = b"scim-id-broker " + purpose.encode()
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
            self._key
        )

    def fingerprint(self) -> str:
        """What the database records of the key: a subkey for this purpose alone (HKDF, an
        HMAC-SHA256 construction), from which the key cannot be found."""
        return self.derive("key fingerprint").hex()

    def seal(self, values: Mapping[str, Any]) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, orjson.dumps(dict(values)), _AAD)

    def open(self, sealed: bytes) -> dict[str, Any]:
        try:
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AAD)
        except InvalidTag:
            raise SealError(
                "write-only values (a password) in this delivery were sealed with another key: "
                "give every broker sharing the database the same [propagation] secret_key_env, "
                "or set the password again"
            ) from None
        values: dict[str, Any] = orjson.loads(plain)
        return values


def load_box(
    key_env: str | None,
    data_dir: Path,
    *,
    key_file: Path | None = None,
    database_url: str | None = None,
) -> SecretBox:
    """The key: from the variable ``key_env``; else from ``key_file`` (made when missing); else,
    with the embedded PostgreSQL only, from ``outbox.key`` in the data directory (made on first
    use). With a ``database_url`` and neither configured, ConfigError: a key made in this
    process's data directory would differ from every other process's."""
    if key_env:
        encoded = os.environ.get(key_env)
        if not encoded:
            raise ConfigError(
                f"[propagation] secret_key_env names {key_env}, which is not set: export it "
                "with the key every broker process shares "
                '(python -c "import secrets; print(secrets.token_urlsafe(32))" makes a new one)'
            )
        return SecretBox(_decode(encoded, key_env))
    if key_file is not None:
        return SecretBox(_decode(_read_or_make(key_file), str(key_file)))
    path = data_dir / "outbox.key"
    if database_url is not None and not path.exists():
        raise ConfigError(
            "[database] url is set but no key is: every broker process on that database needs "
            "the same key. Set [propagation] secret_key_env (BROKER_PROPAGATION__SECRET_KEY_ENV) "
            "to a variable holding it, or [propagation] secret_key_file "
            "(BROKER_PROPAGATION__SECRET_KEY_FILE) to a file all processes read (made there if "
            "missing)"
        )
    return SecretBox(_decode(_read_or_make(path), str(path)))


def _read_or_make(path: Path) -> str:
    """The key in ``path``, written there first (owner-only) when the file does not exist."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first: read theirs
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"the key file {path} cannot be read or made ({exc.strerror}): fix its directory's "
            "permissions, or set [propagation] secret_key_file to another path"
        ) from None


async def check_key(pool: asyncpg.Pool, box: SecretBox, source: str) -> None:
    """The first process records the key's fingerprint; any other with a different key is
    refused with ConfigError (``source`` says where this process's key came from)."""
    fingerprint = box.fingerprint()
    stored = await pool.fetchval(query("claim_key_fingerprint"), fingerprint)
    if stored is None:  # recorded meanwhile by a process that started at the same moment
        stored = await pool.fetchval(query("key_fingerprint"))
    if stored != fingerprint:
        raise ConfigError(
            f"the key from {source} is not the key of this database (fingerprint "
            f"{fingerprint[:12]} here, {str(stored)[:12]} recorded): every broker process on "
            "one database must use the same key. Give this one the others' key through "
            "[propagation] secret_key_env or a key file they all share ([propagation] "
            "secret_key_file)"
        )


def key_source(key_env: str | None, key_file: Path | None, data_dir: Path) -> str:
    """Where :func:`load_box` takes the key from, in words for messages."""
    if key_env:
        return f"the variable {key_env} ([propagation] secret_key_env)"
    if key_file is not None:
        return f"the key file {key_file} ([propagation] secret_key_file)"
    return f"{data_dir / 'outbox.key'} (the data directory)"


def _decode(encoded: str, where: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where} does not hold a key: 32 random bytes, base64url-encoded"
        ) from None
