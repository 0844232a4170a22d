"""SET signing keys, JWKS and verification: joserfc checks what the broker signs, and a SET the
receiver must refuse carries its RFC 8935 error code."""

from __future__ import annotations

import base64
import json
from types import MappingProxyType
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from broker.events.keys import SetError, SigningKey, generate_key, jwks, sign_set, verify_set

ISSUER = "https://home.example.com"
AUDIENCE = "https://broker.example.com/events"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": "6164f3bbf6ff41a88dc94f18cb0620e8",
        "iat": 1458505044,
        "txn": "b7b953f11cc6489bbfb87834747cc4c1",
        "sub_id": {"format": "scim", "uri": "/Users/2b2f880af6674ac284bae9381673d462"},
        "events": {"urn:ietf:params:scim:event:prov:delete": {}},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_key()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return generate_key()


# --- keys and JWKS ------------------------------------------------------------------------------


def test_a_generated_key_is_p256_pkcs8_and_named_by_its_thumbprint(key: SigningKey) -> None:
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    imported = ECKey.import_key(key.private_pem)
    assert imported.curve_name == "P-256"
    assert key.kid == ECKey.import_key(key.public_jwk()).thumbprint()


def test_the_public_jwk_has_no_private_member(key: SigningKey) -> None:
    public = key.public_jwk()
    assert set(public) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert public["kty"] == "EC" and public["crv"] == "P-256"
    assert (public["kid"], public["use"], public["alg"]) == (key.kid, "sig", "ES256")
    assert not ECKey.import_key(public).is_private


def test_the_private_key_stays_out_of_the_repr(key: SigningKey) -> None:
    assert "PRIVATE" not in repr(key) and key.kid in repr(key)


def test_a_key_whose_kid_is_not_its_thumbprint_is_refused(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="not the key's thumbprint"):
        SigningKey(kid="rotated-2026", private_pem=key.private_pem)


def test_a_key_on_another_curve_is_refused() -> None:
    p384 = ECKey.generate_key("P-384", private=True)
    with pytest.raises(ValueError, match="not P-256"):
        SigningKey(kid=p384.thumbprint(), private_pem=p384.as_pem(private=True))


def test_a_public_key_cannot_sign(key: SigningKey) -> None:
    public_pem = ECKey.import_key(key.private_pem).as_pem(private=False)
    with pytest.raises(ValueError, match="private key"):
        SigningKey(kid=key.kid, private_pem=public_pem)


def test_jwks_lists_the_public_keys(key: SigningKey, other_key: SigningKey) -> None:
    assert jwks([key.public_jwk(), other_key.public_jwk()]) == {
        "keys": [key.public_jwk(), other_key.public_jwk()]
    }
    assert jwks([]) == {"keys": []}


def test_jwks_refuses_a_private_member(key: SigningKey) -> None:
    private = ECKey.import_key(key.private_pem).as_dict(private=True)
    with pytest.raises(ValueError, match=r"private members \['d'\]"):
        jwks([key.public_jwk(), private])


# --- signing ------------------------------------------------------------------------------------


def test_a_set_is_a_compact_jws_typed_secevent_jwt(key: SigningKey) -> None:
    token = sign_set(claims(), key)
    assert token.count(".") == 2
    assert segment(token, 0) == {"alg": "ES256", "typ": "secevent+jwt", "kid": key.kid}
    assert segment(token, 1) == claims()


def test_joserfc_verifies_what_the_broker_signs_against_the_published_jwks(
    key: SigningKey, other_key: SigningKey
) -> None:
    published = KeySet.import_key_set(jwks([other_key.public_jwk(), key.public_jwk()]))  # type: ignore[arg-type]
    token = jwt.decode(sign_set(claims(), key), published, algorithms=["ES256"])
    assert token.header == {"alg": "ES256", "typ": "secevent+jwt", "kid": key.kid}
    assert token.claims == claims()


def test_claims_may_be_read_only_mappings_with_tuples(key: SigningKey) -> None:
    frozen = MappingProxyType(
        {
            **claims(),
            "events": MappingProxyType(
                {"urn:ietf:params:scim:event:prov:put:notice": {"attributes": ("emails",)}}
            ),
        }
    )
    verified = verify_set(sign_set(frozen, key), jwks([key.public_jwk()]))
    assert verified["events"] == {
        "urn:ietf:params:scim:event:prov:put:notice": {"attributes": ["emails"]}
    }


def test_signing_does_not_reparse_the_key(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    sign_set(claims(), key)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the PEM was parsed again")

    monkeypatch.setattr(ECKey, "import_key", refuse)
    sign_set(claims(), key)


# --- verifying ----------------------------------------------------------------------------------


def test_a_good_set_verifies_and_returns_its_claims(key: SigningKey) -> None:
    verified = verify_set(
        sign_set(claims(), key), jwks([key.public_jwk()]), issuer=ISSUER, audience=AUDIENCE
    )
    assert verified == claims()


def test_both_keys_of_a_rotating_jwks_verify(key: SigningKey, other_key: SigningKey) -> None:
    published = jwks([key.public_jwk(), other_key.public_jwk()])
    for signer in (key, other_key):
        assert verify_set(sign_set(claims(), signer), published)["jti"] == claims()["jti"]


def test_an_rs256_set_from_the_home_verifies() -> None:
    rsa = RSAKey.generate_key(2048, private=True, auto_kid=True)
    token = jwt.encode({"alg": "RS256", "kid": rsa.kid}, claims(), rsa, default_type=None)
    published = {"keys": [rsa.as_dict(private=False)]}
    assert verify_set(token, published, issuer=ISSUER, audience=AUDIENCE) == claims()


def test_a_tampered_set_is_refused(key: SigningKey) -> None:
    header, _, signature = sign_set(claims(), key).split(".")
    forged = base64.urlsafe_b64encode(json.dumps(claims(iss="https://evil.example")).encode())
    token = f"{header}.{forged.decode().rstrip('=')}.{signature}"
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_key"
    assert "signature does not verify" in str(refused.value)
    with pytest.raises(BadSignatureError):
        jwt.decode(token, ECKey.import_key(key.public_jwk()), algorithms=["ES256"])


def test_a_set_signed_by_another_key_under_a_known_kid_is_refused(
    key: SigningKey, other_key: SigningKey
) -> None:
    impostor = jws.serialize_compact(
        {"alg": "ES256", "typ": "secevent+jwt", "kid": key.kid},
        json.dumps(claims()),
        ECKey.import_key(other_key.private_pem),
    )
    with pytest.raises(SetError) as refused:
        verify_set(impostor, jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_key"


def test_an_unknown_kid_is_an_invalid_key(key: SigningKey, other_key: SigningKey) -> None:
    with pytest.raises(SetError) as refused:
        verify_set(sign_set(claims(), other_key), jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_key"
    assert other_key.kid in str(refused.value)
    assert refused.value.to_error() == {"err": "invalid_key", "description": str(refused.value)}


def test_a_kid_whose_key_is_for_encryption_is_an_invalid_key(key: SigningKey) -> None:
    encryption_only = {**key.public_jwk(), "use": "enc"}
    with pytest.raises(SetError) as refused:
        verify_set(sign_set(claims(), key), {"keys": [encryption_only]})
    assert refused.value.err == "invalid_key"


def test_without_a_kid_only_a_single_key_jwks_can_verify(
    key: SigningKey, other_key: SigningKey
) -> None:
    token = jws.serialize_compact(
        {"alg": "ES256", "typ": "secevent+jwt"},
        json.dumps(claims()),
        ECKey.import_key(key.private_pem),
    )
    assert verify_set(token, jwks([key.public_jwk()])) == claims()
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk(), other_key.public_jwk()]))
    assert refused.value.err == "invalid_key"


@pytest.mark.parametrize(
    ("aud", "ok"),
    [
        (AUDIENCE, True),
        (["https://other.example", AUDIENCE], True),
        ("https://other.example", False),
        (["https://other.example"], False),
        (None, False),
    ],
)
def test_the_audience_must_include_the_receiver(key: SigningKey, aud: Any, ok: bool) -> None:
    token = sign_set(claims(aud=aud), key)
    if ok:
        assert verify_set(token, jwks([key.public_jwk()]), audience=AUDIENCE)["aud"] == aud
        return
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]), audience=AUDIENCE)
    assert refused.value.err == "invalid_audience"


@pytest.mark.parametrize("iss", ["https://home.example.com/", "https://evil.example", None])
def test_the_issuer_must_be_the_expected_one(key: SigningKey, iss: str | None) -> None:
    with pytest.raises(SetError) as refused:
        verify_set(sign_set(claims(iss=iss), key), jwks([key.public_jwk()]), issuer=ISSUER)
    assert refused.value.err == "invalid_issuer"


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({"jti": None}, "jti"),
        ({"jti": ""}, "jti"),
        ({"iat": None}, "iat"),
        ({"iat": "1458505044"}, "iat"),
        ({"iat": True}, "iat"),
        ({"events": None}, "events"),
        ({"events": {}}, "events"),
        ({"events": {"urn:ietf:params:scim:event:prov:delete": "gone"}}, "not a JSON object"),
    ],
)
def test_a_set_without_jti_iat_or_events_is_an_invalid_request(
    key: SigningKey, overrides: dict[str, Any], missing: str
) -> None:
    with pytest.raises(SetError, match=missing) as refused:
        verify_set(sign_set(claims(**overrides), key), jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_request"


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "secevent"])
def test_a_jwt_of_another_type_is_an_invalid_request(key: SigningKey, typ: str) -> None:
    token = jws.serialize_compact(
        {"alg": "ES256", "typ": typ, "kid": key.kid},
        json.dumps(claims()),
        ECKey.import_key(key.private_pem),
    )
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_request"


def test_the_full_media_type_is_accepted_as_typ(key: SigningKey) -> None:
    token = jws.serialize_compact(
        {"alg": "ES256", "typ": "application/secevent+jwt", "kid": key.kid},
        json.dumps(claims()),
        ECKey.import_key(key.private_pem),
    )
    assert verify_set(token, jwks([key.public_jwk()])) == claims()


def test_an_algorithm_not_accepted_is_an_invalid_key(key: SigningKey) -> None:
    token = sign_set(claims(), key)
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]), algorithms=("RS256",))
    assert refused.value.err == "invalid_key"


def test_an_hmac_set_signed_with_the_public_key_is_refused(key: SigningKey) -> None:
    secret = OctKey.import_key(json.dumps(key.public_jwk()).encode())
    token = jws.serialize_compact(
        {"alg": "HS256", "typ": "secevent+jwt", "kid": key.kid}, json.dumps(claims()), secret
    )
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]), algorithms=("ES256", "RS256", "HS256"))
    assert refused.value.err == "invalid_key"


def test_an_unsigned_set_is_refused(key: SigningKey) -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"secevent+jwt"}').decode().rstrip("=")
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).decode().rstrip("=")
    with pytest.raises(SetError) as refused:
        verify_set(f"{header}.{payload}.", jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_key"


@pytest.mark.parametrize("token", ["", "not a token", "a.b", "a.b.c.d.e", "é.é.é"])
def test_garbage_is_an_invalid_request(key: SigningKey, token: str) -> None:
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_request"


def test_a_payload_that_is_not_an_object_is_an_invalid_request(key: SigningKey) -> None:
    token = jws.serialize_compact(
        {"alg": "ES256", "typ": "secevent+jwt", "kid": key.kid},
        b"[1, 2]",
        ECKey.import_key(key.private_pem),
    )
    with pytest.raises(SetError) as refused:
        verify_set(token, jwks([key.public_jwk()]))
    assert refused.value.err == "invalid_request"


def test_an_unusable_jwks_is_an_invalid_key(key: SigningKey) -> None:
    token = sign_set(claims(), key)
    for broken in ({}, {"keys": "none"}, {"keys": [{"kty": "EC"}]}):
        with pytest.raises(SetError) as refused:
            verify_set(token, broken)
        assert refused.value.err == "invalid_key"
