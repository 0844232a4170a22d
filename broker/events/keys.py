"""Signing and verifying Security Event Tokens (RFC 8417) with ES256 keys published as a JWKS.

The broker signs the SETs it issues with its own P-256 key (``kid`` is the RFC 7638 thumbprint)
and verifies the SETs the home pushes to it (RFC 8935) against the home's JWKS, refusing a bad one
with the RFC 8935 section 2.4 error code the receiver returns.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from joserfc import jws
from joserfc.errors import (
    InvalidKeyIdError,
    JoseError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import ECKey, KeyParameters, KeySet

__all__ = [
    "ALGORITHM",
    "SET_TYPE",
    "SetError",
    "SigningKey",
    "generate_key",
    "jwks",
    "sign_set",
    "verify_set",
]

ALGORITHM = "ES256"
#: The explicit type of a SET (RFC 8417 section 2.3).
SET_TYPE = "secevent+jwt"
#: Largest SET accepted, in bytes of its payload segment (a full event of a large group is big).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
# Members of a JWK that only a private key has (RFC 7517, RFC 7518 section 6).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_SIGNING = jws.JWSRegistry(algorithms=[ALGORITHM])


class SetError(Exception):
    """A SET the receiver must refuse (RFC 8935 section 2.4): ``err`` is the error code, the
    message its human-readable description."""

    INVALID_REQUEST: ClassVar[str] = "invalid_request"
    INVALID_KEY: ClassVar[str] = "invalid_key"
    INVALID_ISSUER: ClassVar[str] = "invalid_issuer"
    INVALID_AUDIENCE: ClassVar[str] = "invalid_audience"
    AUTHENTICATION_FAILED: ClassVar[str] = "authentication_failed"
    ACCESS_DENIED: ClassVar[str] = "access_denied"

    err: str

    def __init__(self, err: str, description: str) -> None:
        super().__init__(description)
        self.err = err

    def to_error(self) -> dict[str, str]:
        """The failure response body (RFC 8935 section 2.4)."""
        return {"err": self.err, "description": str(self)}


@dataclass(frozen=True)
class SigningKey:
    """One of the broker's ES256 keys for signing SETs."""

    kid: str
    """The RFC 7638 JWK thumbprint (SHA-256) of the key."""
    private_pem: bytes = field(repr=False)
    """The private key, PKCS8 PEM, unencrypted: the caller seals it at rest."""

    def __post_init__(self) -> None:
        key = _private_key(self.private_pem)
        if key.curve_name != "P-256":
            raise ValueError(f"SET signing key {self.kid!r} is on {key.curve_name}, not P-256")
        if key.thumbprint() != self.kid:
            raise ValueError(f"SET signing key kid {self.kid!r} is not the key's thumbprint")

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK to publish: never a private member."""
        public = _private_key(self.private_pem).as_dict(private=False)
        return {
            "kty": "EC",
            "crv": public["crv"],
            "x": public["x"],
            "y": public["y"],
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }


def generate_key() -> SigningKey:
    """A new ES256 (P-256) signing key."""
    key = ECKey.generate_key("P-256", private=True)
    return SigningKey(kid=key.thumbprint(), private_pem=key.as_pem(private=True))


def sign_set(claims: Mapping[str, Any], key: SigningKey) -> str:
    """``claims`` as a compact JWS signed with ``key`` (typ ``secevent+jwt``, RFC 8417 section 2.3)."""
    header = {"alg": ALGORITHM, "typ": SET_TYPE, "kid": key.kid}
    payload = orjson.dumps(claims, default=_jsonable)
    return jws.serialize_compact(header, payload, _private_key(key.private_pem), registry=_SIGNING)


def jwks(public_jwks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A JWK Set (RFC 7517 section 5) of public keys; a private member anywhere is refused."""
    keys = []
    for jwk in public_jwks:
        leaked = _PRIVATE_MEMBERS.intersection(jwk)
        if leaked:
            raise ValueError(
                f"JWK {jwk.get('kid')!r} has private members {sorted(leaked)}: publish public keys only"
            )
        keys.append(dict(jwk))
    return {"keys": keys}


def verify_set(
    token: str,
    key_set: Mapping[str, Any],
    *,
    issuer: str | None = None,
    audience: str | None = None,
    algorithms: Sequence[str] = ("ES256", "RS256"),
) -> dict[str, Any]:
    """The claims of a SET pushed to the broker, after checking it; SetError when it must be refused.

    The signature is checked with the key of ``key_set`` (a JWKS) that the header's ``kid`` names;
    ``typ``, when present, must be ``secevent+jwt``; ``iss`` and ``aud`` must match when given; the
    claims must carry ``jti``, ``iat`` and ``events`` (RFC 8417 section 2.2).
    """
    registry = _verifying_registry(tuple(algorithms))
    try:
        signed = jws.extract_compact(token.encode("ascii"), registry=registry)
        header = signed.headers()
        registry.check_header(header)
    except (JoseError, UnicodeError, ValueError) as exc:
        raise SetError(SetError.INVALID_REQUEST, f"not a signed JWT: {exc}") from exc
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or _media_type(typ) != SET_TYPE):
        raise SetError(SetError.INVALID_REQUEST, f"typ is {typ!r}, not {SET_TYPE!r}")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise SetError(
            SetError.INVALID_KEY, f"alg {alg!r} is not accepted (accepted: {', '.join(algorithms)})"
        )
    kid = header.get("kid")
    wanted: KeyParameters = {"use": "sig", "alg": alg}
    try:
        keys = _key_set(orjson.dumps(key_set, default=_jsonable))
        key = keys.get_by_kid(kid if isinstance(kid, str) else None, wanted)
    except InvalidKeyIdError as exc:
        raise SetError(
            SetError.INVALID_KEY, f"no key with kid {kid!r} in the issuer's JWKS"
        ) from exc
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise SetError(SetError.INVALID_KEY, f"the issuer's JWKS is unusable: {exc}") from exc
    try:
        valid = jws.validate_compact(signed, key, registry=registry)
    except UnsupportedAlgorithmError as exc:
        raise SetError(SetError.INVALID_KEY, f"alg {alg!r} is not accepted") from exc
    except (JoseError, ValueError) as exc:
        raise SetError(
            SetError.INVALID_KEY, f"key {kid!r} cannot verify an {alg} SET: {exc}"
        ) from exc
    if not valid:
        raise SetError(SetError.INVALID_KEY, f"the signature does not verify with key {kid!r}")
    return _checked_claims(signed.payload or b"", issuer=issuer, audience=audience)


def _checked_claims(payload: bytes, *, issuer: str | None, audience: str | None) -> dict[str, Any]:
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise SetError(SetError.INVALID_REQUEST, "the claims are not JSON") from exc
    if not isinstance(claims, dict):
        raise SetError(SetError.INVALID_REQUEST, "the claims are not a JSON object")
    if not isinstance(claims.get("jti"), str) or not claims["jti"]:
        raise SetError(SetError.INVALID_REQUEST, "the SET has no jti")
    iat = claims.get("iat")
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        raise SetError(SetError.INVALID_REQUEST, "the SET has no numeric iat")
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise SetError(SetError.INVALID_REQUEST, "the SET has no events")
    for uri, payload_claims in events.items():
        if not isinstance(payload_claims, dict):
            raise SetError(SetError.INVALID_REQUEST, f"event {uri!r} is not a JSON object")
    if issuer is not None and claims.get("iss") != issuer:
        raise SetError(SetError.INVALID_ISSUER, f"iss {claims.get('iss')!r} is not {issuer!r}")
    if audience is not None:
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in audiences:
            raise SetError(SetError.INVALID_AUDIENCE, f"aud {aud!r} does not include {audience!r}")
    return claims


@functools.lru_cache(maxsize=64)
def _private_key(pem: bytes) -> ECKey:
    """The imported key, parsed once per PEM: signing thousands of SETs a second must not re-parse."""
    key = ECKey.import_key(pem)
    if not key.is_private:
        raise ValueError("a SET signing key must be a private key")
    return key


@functools.lru_cache(maxsize=64)
def _key_set(serialized: bytes) -> KeySet:
    """The JWKS imported once per distinct content (the home's JWKS changes rarely)."""
    value = orjson.loads(serialized)
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise ValueError("a JWKS is an object with a keys array")
    return KeySet.import_key_set({"keys": value["keys"]})


@functools.lru_cache(maxsize=16)
def _verifying_registry(algorithms: tuple[str, ...]) -> jws.JWSRegistry:
    registry = jws.JWSRegistry(algorithms=list(algorithms), strict_check_header=False)
    registry.max_payload_length = MAX_PAYLOAD_BYTES
    return registry


def _media_type(typ: str) -> str:
    """``typ`` without the optional ``application/`` prefix (RFC 7515 section 4.1.9), lower-cased."""
    lowered = typ.strip().lower()
    return lowered.removeprefix("application/")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
