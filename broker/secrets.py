"""Write-only attribute values (``returned: never``, such as ``password``) on their way to peers.

Home never returns them, so a password set through the broker is delivered from the write itself
(RFC 7642 section 2.3.6). Between the write and the delivery it waits in the outbox sealed with
AES-256-GCM, under a key kept outside the database: an operator's environment variable, or a file
of the data directory that the broker creates on first use (readable by its owner only). Several
broker processes sharing one database must share the key. Values are never logged.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.config import ConfigError

__all__ = ["SealError", "SecretBox", "load_box"]

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


def load_box(key_env: str | None, data_dir: Path) -> SecretBox:
    """The outbox key from the environment variable ``key_env``, or from ``outbox.key`` in the
    data directory (created on first use)."""
    if key_env:
        encoded = os.environ.get(key_env)
        if not encoded:
            raise ConfigError(
                f"[propagation] secret_key_env names {key_env}, which is not set: export it "
                '(python -c "import secrets; print(secrets.token_urlsafe(32))" makes a key)'
            )
        return SecretBox(_decode(encoded, key_env))
    path = data_dir / "outbox.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    return SecretBox(_decode(path.read_text().strip(), str(path)))


def _decode(encoded: str, where: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where} does not hold a key: 32 random bytes, base64url-encoded"
        ) from None
