"""Token verification: HS256, RS256, ES256, required claims, leeway, patterns."""

from __future__ import annotations

import random
import re
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth import AuthError, PatternSet, TokenVerifier, make_token
from auth.permissions import ANSWERS_KEPT

K = "k" * 32


def pem_pair(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, str]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_public_key_tokens_are_verified(
    algorithm: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> None:
    private, public = pem_pair(key)
    verifier = TokenVerifier(public_key=public)
    token = jwt.encode({"sub": "alice", "subscribe": ["a:*"]}, private, algorithm=algorithm)
    claims = verifier.verify(token)
    assert claims.user == "alice" and claims.can_subscribe("a:b") and not claims.can_publish("a:b")
    forged = jwt.encode({"sub": "alice"}, "not-the-key" * 4, algorithm="HS256")
    with pytest.raises(AuthError):
        verifier.verify(forged)


@pytest.mark.parametrize(
    ("key", "claimed"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "ES256"),
        (ec.generate_private_key(ec.SECP256R1()), "RS256"),
    ],
)
def test_a_token_claiming_the_other_keys_algorithm_is_refused(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, claimed: str
) -> None:
    """Regression: PyJWT raises InvalidKeyError (not an InvalidTokenError) for an ES256
    token against an RSA key, and anyone could send one (a junk signature will do): it
    escaped the verifier, a 500 on the API and a dropped WebSocket handshake."""
    _, public = pem_pair(key)
    header = jwt.utils.base64url_encode(f'{{"alg":"{claimed}","typ":"JWT"}}'.encode())
    body = jwt.utils.base64url_encode(b'{"sub":"mallory"}')
    forged = b".".join([header, body, jwt.utils.base64url_encode(b"x" * 64)]).decode()
    with pytest.raises(AuthError) as refused:
        TokenVerifier(public_key=public).verify(forged)
    assert str(refused.value) == "invalid token: InvalidKeyError"


def test_hs256_token_with_claims() -> None:
    verifier = TokenVerifier(secret=K)
    claims = verifier.verify(
        make_token(K, "bob", subscribe=["chat:*"], publish=["chat:lobby"], info={"n": 1})
    )
    assert claims.user == "bob" and claims.info == {"n": 1}
    assert claims.can_subscribe("chat:x") and claims.can_publish("chat:lobby")
    assert not claims.can_publish("chat:other") and not claims.can_subscribe("prices")


@pytest.mark.parametrize(
    "payload",
    [
        {},  # no sub
        {"sub": ""},
        {"sub": 5},
        {"sub": "a", "info": [1]},
        {"sub": "a", "subscribe": "x", "publish": [1]},
        {"sub": "a", "info": {"bio": "x" * 4096}},  # presence tells it to every member
        # A NumericDate is a number: PyJWT takes a string of one, which the gateway then
        # never held to (the connection outlived it, a remembered token too).
        {"sub": "a", "exp": str(int(time.time()) + 60)},
        {"sub": "a", "exp": True},
        {"sub": "a", "nbf": "0"},
        {"sub": "a", "iat": "0"},
        # Python's JSON writes and reads NaN and infinities (PyJWT refuses some of them).
        {"sub": "a", "exp": float("nan")},
        {"sub": "a", "exp": float("inf")},
        {"sub": "a", "nbf": float("-inf")},
        {"sub": "a", "iat": float("nan")},
        # Past a signed 64-bit integer: no date; a hook's request could not carry it (every
        # hooked command failed), and past a float's range the check itself raised.
        {"sub": "a", "exp": 2**64},
        {"sub": "a", "exp": 10**400},
    ],
)
def test_tokens_with_bad_claims_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(secret=K).verify(jwt.encode(payload, K, algorithm="HS256"))


def test_an_info_claim_of_the_limit_is_accepted() -> None:
    info = {"bio": "x" * (4096 - len('{"bio":""}'))}
    claims = TokenVerifier(secret=K).verify(jwt.encode({"sub": "a", "info": info}, K))
    assert claims.info == info


def test_expiry_has_at_most_five_seconds_of_leeway() -> None:
    verifier = TokenVerifier(secret=K, leeway=5)
    recent = jwt.encode({"sub": "a", "exp": int(time.time()) - 2}, K, algorithm="HS256")
    assert verifier.verify(recent).user == "a"
    old = jwt.encode({"sub": "a", "exp": int(time.time()) - 10}, K, algorithm="HS256")
    with pytest.raises(AuthError) as info:
        verifier.verify(old)
    assert info.value.expired


def test_missing_token_is_refused() -> None:
    with pytest.raises(AuthError):
        TokenVerifier(secret=K).verify(None)


def test_none_algorithm_is_refused() -> None:
    unsigned = jwt.encode({"sub": "a"}, "", algorithm="none")  # "none" takes "" as no key
    with pytest.raises(AuthError):
        TokenVerifier(secret=K).verify(unsigned)


@pytest.mark.parametrize(
    ("patterns", "name", "allowed"),
    [
        (["chat:*"], "chat:lobby", True),
        (["chat:*"], "chat:a:b", True),
        (["chat:*"], "chatroom", False),
        (["*"], "anything", True),
        (["a.b"], "axb", False),  # '.' is literal
        (["*:admin"], "x:admin", True),
        ([], "x", False),
    ],
)
def test_patterns(patterns: list[str], name: str, allowed: bool) -> None:
    assert PatternSet(patterns)(name) is allowed


def test_patterns_match_as_a_regular_expression_would_in_linear_time() -> None:
    """Randomised against the regular expression the patterns used to be compiled to
    (``*`` as ``.*``), which backtracked: ``*a*a*a*a*a*b`` on 127 ``a`` and a ``c`` held
    the worker for seconds, eight stars for minutes. Now those answer at once (this test
    would not end otherwise)."""
    rng = random.Random(11)
    for _ in range(20_000):
        pattern = "".join(rng.choice("ab*:") for _ in range(rng.randint(0, 8)))
        name = "".join(rng.choice("ab:") for _ in range(rng.randint(0, 10)))
        regex = re.compile("".join(".*" if c == "*" else re.escape(c) for c in pattern))
        assert PatternSet([pattern])(name) is (regex.fullmatch(name) is not None), (pattern, name)
    assert not PatternSet(["*a*a*a*a*a*a*a*a*b"])("a" * 100_000 + "c")
    assert PatternSet(["*a*a*a*a*a*a*a*a*b"])("a" * 100_000 + "b")
    assert not PatternSet(["*a*b*a*b*x*b"])("ab" * 50_000)


def test_a_pattern_sets_remembered_answers_stay_right_and_bounded() -> None:
    """A pattern set keeps its answers by name (bounded): asked again, before and after
    it starts over, each name gets what a new set (nothing remembered) answers."""
    patterns = ["chat:*", "a.b", "*:admin"]
    kept = PatternSet(patterns)
    rng = random.Random(5)
    pool = ["chat:x", "chatroom", "a.b", "axb", "u:admin", "admin", "chat:", ""]
    asked = [rng.choice(pool) + str(rng.randrange(3)) * rng.randrange(2) for _ in range(500)]
    asked += [f"chat:{n}" for n in range(2 * ANSWERS_KEPT)] + asked
    for name in asked:
        assert kept(name) is PatternSet(patterns)(name), name
        assert len(kept._answers) <= ANSWERS_KEPT
    assert not PatternSet([])("x")


def test_tokens_with_the_same_patterns_share_one_pattern_set() -> None:
    """Each verified token kept its own two sets, each with up to 1,024 remembered answers:
    4,096 cached tokens asked for many names held 700 MB in an audit. Tokens with the same
    list share a set now (and a set keeps 64 answers)."""
    verifier = TokenVerifier(secret=K)
    first = verifier.verify(make_token(K, "a", subscribe=["chat:*"], publish=["chat:*"]))
    second = verifier.verify(make_token(K, "b", subscribe=["chat:*"], publish=[]))
    assert first.subscribe is second.subscribe and first.subscribe is first.publish
    assert second.publish is not first.publish
    for n in range(10 * ANSWERS_KEPT):
        assert first.can_subscribe(f"chat:{n}")
    assert len(first.subscribe._answers) <= ANSWERS_KEPT


# --------------------------------------------------------------------------- verified tokens


def test_a_token_verified_once_is_not_verified_again() -> None:
    verifier = TokenVerifier(secret=K)
    token = make_token(K, "alice", subscribe=["a:*"])
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # decoding makes new claims each time


def test_a_remembered_token_still_ends_at_its_expiry() -> None:
    verifier = TokenVerifier(secret=K, leeway=0)
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 1}, K, algorithm="HS256")
    assert verifier.verify(token).user == "alice"
    deadline = time.monotonic() + 5
    while True:
        try:
            verifier.verify(token)
        except AuthError as exc:
            assert exc.expired
            break
        assert time.monotonic() < deadline, "a remembered token outlived its exp"
        time.sleep(0.02)  # polling for the expiry, with a deadline
    with pytest.raises(AuthError):  # and it is forgotten: verified (and refused) afresh
        verifier.verify(token)


def test_invalid_tokens_are_never_remembered() -> None:
    verifier = TokenVerifier(secret=K)
    forged = make_token("another-secret-0123456789abcdef0123", "mallory")
    for _ in range(2):
        with pytest.raises(AuthError):
            verifier.verify(forged)
    assert len(verifier._verified) == 0


def test_remembered_tokens_are_bounded_the_oldest_going_first() -> None:
    verifier = TokenVerifier(secret=K, cache_size=2)
    tokens = [make_token(K, f"user-{n}") for n in range(3)]
    claims = [verifier.verify(t) for t in tokens]
    assert list(verifier._verified) == tokens[1:]
    assert verifier.verify(tokens[0]) is not claims[0]  # verified again
