"""Prekeys and the token key wrap: publish, verify, substitute, exhaust, fall back, forget."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import nacl.bindings as sodium
import pytest
from conftest import make_trio

import tisa.prekeys
from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import Context
from tisa.prekeys import KeyWrap, Prekey, PrekeyKind, PrekeySecret, WrapMode
from tisa.token import ReleaseToken, check_for_recipient, check_for_relay, issue_token

ARRANGEMENT, SECRETS = make_trio()
FALLBACK = dataclasses.replace(ARRANGEMENT, identity_fallback=True)
NOW = 1_420_000_000
REPORT_ID = bytes(range(16))
DIGEST = bytes(range(100, 132))
SIZE = 1089
CONTENT_KEY = bytes(range(200, 232))


class Keyring:
    """A recipient's prekey secrets, deleted as a node deletes them."""

    def __init__(self, owner: str = "tokyo", arrangement: Arrangement = ARRANGEMENT) -> None:
        self.owner = owner
        self.arrangement = arrangement
        self.secrets: dict[bytes, PrekeySecret] = {}
        self.used: set[bytes] = set()

    def make(self, kind: PrekeyKind = PrekeyKind.ONE_TIME, not_after: int = NOW + 3600) -> bytes:
        secret = PrekeySecret.generate(kind, created=not_after - 7200, not_after=not_after)
        self.secrets[secret.public] = secret
        return secret.publish(SECRETS[self.owner], self.owner, self.arrangement)

    def lookup(self, kind: PrekeyKind, public: bytes) -> bytes:
        if public in self.used:
            raise Refused(Reason.REPLAYED, "one-time prekey used before")
        secret = self.secrets.get(public)
        if secret is None or secret.kind is not kind:
            raise Refused(Reason.UNKNOWN_PREKEY, "not held")
        return secret.secret

    def consume(self, public: bytes) -> None:
        del self.secrets[public]
        self.used.add(public)


def issue(arrangement: Arrangement = ARRANGEMENT, **changes: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "recipient": "tokyo",
        "report_id": REPORT_ID,
        "digest": DIGEST,
        "size": SIZE,
        "content_key": CONTENT_KEY,
        "scope": "missile",
        "level": "secret",
        "not_before": NOW,
        "not_after": NOW + 3600,
        "counter": 1,
    }
    kwargs.update(changes)
    return issue_token(SECRETS["seoul"], "seoul", arrangement, **kwargs)


def open_token(
    token: bytes,
    lookup: Callable[[PrekeyKind, bytes], bytes] | None,
    arrangement: Arrangement = ARRANGEMENT,
) -> bytes:
    release = check_for_recipient(
        token, arrangement, SECRETS["tokyo"], "tokyo", now=NOW, prekey_secret=lookup
    )
    return release.content_key


def resign(token: bytes, **changes: Any) -> bytes:
    body = enc.unpack(enc.unpack(token)["body"])
    body.update(changes)
    data = enc.pack(body)
    return enc.pack({"body": data, "sig": SECRETS["seoul"].sign(Context.TOKEN, data)})


# --- prekeys -----------------------------------------------------------------------------


def test_prekey_round_trip() -> None:
    ring = Keyring()
    data = ring.make(PrekeyKind.SIGNED)
    prekey = Prekey.verify(data, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)
    assert prekey.owner == "tokyo" and prekey.kind is PrekeyKind.SIGNED
    assert prekey.key in ring.secrets and prekey.arrangement == ARRANGEMENT.id
    assert "secret" not in repr(next(iter(ring.secrets.values()))).lower().replace(
        "<prekeysecret", ""
    )


@pytest.mark.parametrize(
    ("owner", "kind", "now", "reason"),
    [
        ("seoul", PrekeyKind.SIGNED, NOW, Reason.BAD_PREKEY),  # Tokyo's, offered as Seoul's
        ("tokyo", PrekeyKind.ONE_TIME, NOW, Reason.BAD_PREKEY),  # signed, offered as one-time
        ("tokyo", PrekeyKind.SIGNED, NOW + 3600 + 120, Reason.EXPIRED),
    ],
)
def test_substituted_or_stale_prekeys_are_refused(
    owner: str, kind: PrekeyKind, now: int, reason: Reason
) -> None:
    data = Keyring().make(PrekeyKind.SIGNED)
    with pytest.raises(Refused) as info:
        Prekey.verify(data, ARRANGEMENT, owner=owner, kind=kind, now=now)
    assert info.value.reason is reason


def test_prekey_of_another_arrangement_version_is_refused() -> None:
    amended = ARRANGEMENT.amend(scopes=("missile",))
    data = Keyring(arrangement=amended).make()
    with pytest.raises(Refused) as info:
        Prekey.verify(data, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.ONE_TIME, now=NOW)
    assert info.value.reason is Reason.BAD_PREKEY


def test_forged_prekey_fails_opaquely() -> None:
    # The relay makes up a prekey of its own and signs it with another member's key.
    secret = PrekeySecret.generate(PrekeyKind.SIGNED, created=NOW, not_after=NOW + 60)
    seouls = secret.publish(SECRETS["seoul"], "seoul", ARRANGEMENT)
    outer = enc.unpack(seouls)
    body = enc.unpack(outer["body"])
    body["owner"] = "tokyo"
    forged = enc.pack({"body": enc.pack(body), "sig": outer["sig"]})
    with pytest.raises(VerificationError):
        Prekey.verify(forged, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)
    # A prekey in the relay's name: the relay has no recipient role, so no key to check.
    body["owner"] = "washington"
    data = enc.pack(body)
    signed = enc.pack({"body": data, "sig": SECRETS["washington"].sign(Context.PREKEY, data)})
    with pytest.raises(VerificationError):
        Prekey.verify(signed, ARRANGEMENT, owner="washington", kind=PrekeyKind.SIGNED, now=NOW)
    # Signed in another context.
    body["owner"] = "tokyo"
    data = enc.pack(body)
    wrong = enc.pack({"body": data, "sig": SECRETS["tokyo"].sign(Context.TOKEN, data)})
    with pytest.raises(VerificationError):
        Prekey.verify(wrong, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)


def test_malformed_prekeys() -> None:
    data = Keyring().make()
    body = enc.unpack(enc.unpack(data)["body"])
    for change in (
        {"key": bytes(32)},  # low order
        {"not_after": body["created"]},  # empty lifetime
        {"kind": "forever"},
        {"v": 1},
    ):
        changed = enc.pack({**body, **change})
        envelope = enc.pack(
            {"body": changed, "sig": SECRETS["tokyo"].sign(Context.PREKEY, changed)}
        )
        with pytest.raises(ProtocolError):
            Prekey.decode(envelope)
    with pytest.raises(ProtocolError):
        Prekey.decode(data + b"\x00")


def test_publish_refuses_a_key_that_is_not_the_owners() -> None:
    secret = PrekeySecret.generate(PrekeyKind.SIGNED, created=NOW, not_after=NOW + 60)
    with pytest.raises(UsageError):
        secret.publish(SECRETS["seoul"], "tokyo", ARRANGEMENT)
    with pytest.raises(Refused):
        secret.publish(SECRETS["washington"], "washington", ARRANGEMENT)
    with pytest.raises(UsageError):
        PrekeySecret(kind=PrekeyKind.SIGNED, secret=b"x" * 31, created=0, not_after=1)
    with pytest.raises(UsageError):
        PrekeySecret(kind=PrekeyKind.SIGNED, secret=b"x" * 32, created=5, not_after=5)


# --- wrap modes --------------------------------------------------------------------------


def test_one_time_mode_round_trip_and_forget() -> None:
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED), one_time_prekey=ring.make())
    wrap = ReleaseToken.decode(token).wrap
    assert wrap.mode is WrapMode.ONE_TIME and wrap.opk is not None
    assert open_token(token, ring.lookup) == CONTENT_KEY
    # The recipient deletes the one-time secret: the same token (or another naming the
    # same prekey: a replay) opens no more.
    ring.consume(wrap.opk)
    with pytest.raises(Refused) as info:
        open_token(token, ring.lookup)
    assert info.value.reason is Reason.REPLAYED


def test_exhausted_supply_falls_back_to_the_signed_prekey_and_says_so() -> None:
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED))
    decoded = ReleaseToken.decode(token)
    assert decoded.wrap.mode is WrapMode.SIGNED and decoded.wrap.opk is None
    assert open_token(token, ring.lookup) == CONTENT_KEY


def test_no_signed_prekey_refuses_unless_the_arrangement_allows_identity() -> None:
    with pytest.raises(Refused) as info:
        issue(signed_prekey=None)
    assert info.value.reason is Reason.NO_PREKEY
    token = issue(FALLBACK, signed_prekey=None)
    assert ReleaseToken.decode(token).wrap.mode is WrapMode.IDENTITY
    assert open_token(token, None, FALLBACK) == CONTENT_KEY
    # The same token checked under an arrangement without the fallback is refused, by
    # the relay and the recipient alike (a different arrangement id, so re-signed).
    plain = resign(token, arrangement=ARRANGEMENT.id)
    with pytest.raises(Refused) as info:
        open_token(plain, None)
    assert info.value.reason is Reason.FALLBACK_NOT_ALLOWED
    with pytest.raises(Refused) as info:
        check_for_relay(
            plain,
            ARRANGEMENT,
            report_id=REPORT_ID,
            digest=DIGEST,
            size=SIZE,
            originator="seoul",
            now=NOW,
        )
    assert info.value.reason is Reason.FALLBACK_NOT_ALLOWED


def test_issue_refuses_substituted_prekeys() -> None:
    seouls = Keyring("seoul")
    tokyos = Keyring()
    with pytest.raises(Refused) as info:
        issue(signed_prekey=seouls.make(PrekeyKind.SIGNED))
    assert info.value.reason is Reason.BAD_PREKEY
    with pytest.raises(Refused) as info:
        issue(signed_prekey=tokyos.make(PrekeyKind.SIGNED), one_time_prekey=seouls.make())
    assert info.value.reason is Reason.BAD_PREKEY
    with pytest.raises(Refused) as info:
        issue(signed_prekey=tokyos.make(PrekeyKind.SIGNED, not_after=NOW - 200))
    assert info.value.reason is Reason.EXPIRED
    with pytest.raises(UsageError):
        issue(signed_prekey=None, one_time_prekey=tokyos.make())


def test_wrap_mode_must_match_the_prekeys_named() -> None:
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED), one_time_prekey=ring.make())
    wrap = enc.unpack(enc.unpack(token)["body"])["wrap"]
    for change in ({"mode": "signed"}, {"mode": "identity"}, {"spk": None}, {"mode": "x"}):
        with pytest.raises(ProtocolError):
            ReleaseToken.decode(resign(token, wrap={**wrap, **change}))
    with pytest.raises(ProtocolError):
        KeyWrap.from_dict({**wrap, "extra": 1})


def test_unknown_signed_prekey_is_refused_with_its_code() -> None:
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED))
    with pytest.raises(Refused) as info:
        open_token(token, Keyring().lookup)
    assert info.value.reason is Reason.UNKNOWN_PREKEY


def test_a_wrong_prekey_secret_fails_opaquely() -> None:
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED), one_time_prekey=ring.make())
    with pytest.raises(VerificationError):
        open_token(token, lambda kind, public: bytes(range(32)))


def test_wrap_derivation_matches_the_specification() -> None:
    """docs/protocol.md section 10.2, computed with hashlib and raw libsodium calls."""
    ring = Keyring()
    eph_secret = bytes(range(1, 33))
    token = issue(
        signed_prekey=ring.make(PrekeyKind.SIGNED),
        one_time_prekey=ring.make(),
        _ephemeral=eph_secret,
    )
    decoded = ReleaseToken.decode(token)
    wrap = decoded.wrap
    assert wrap.spk is not None and wrap.opk is not None
    identity = SECRETS["tokyo"].public.encryption.raw
    shared = b"".join(
        sodium.crypto_scalarmult(eph_secret, key) for key in (identity, wrap.spk, wrap.opk)
    )
    transcript = b"one_time\n" + wrap.eph + identity + wrap.spk + wrap.opk
    key = hashlib.blake2b(shared + transcript, digest_size=32, person=b"tisa1-prekeywrap").digest()
    body = enc.unpack(decoded.body)
    del body["wrap"]
    opened = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
        wrap.sealed, enc.pack(body), bytes(24), key
    )
    assert opened == CONTENT_KEY
    assert wrap.eph == sodium.crypto_scalarmult_base(eph_secret)


def test_long_term_keys_alone_open_no_prekey_token() -> None:
    """Forward secrecy in the core: once the prekey secrets are gone, the recipient's
    long-term secret, with every other combination of Diffie-Hellman values it can
    compute, does not derive the wrap key."""
    ring = Keyring()
    token = issue(signed_prekey=ring.make(PrekeyKind.SIGNED), one_time_prekey=ring.make())
    wrap = ReleaseToken.decode(token).wrap
    ring.secrets.clear()
    with pytest.raises(Refused):
        open_token(token, ring.lookup)
    # Whatever the long-term key can stand in for, the AEAD does not open.
    dh_identity = SECRETS["tokyo"].exchange(wrap.eph)
    for stand_in in (
        lambda kind, public: SECRETS["tokyo"]._box_secret,
        lambda kind, public: dh_identity,
        lambda kind, public: bytes(32),
    ):
        with pytest.raises(VerificationError):
            open_token(token, stand_in)


# --- arrangement option ------------------------------------------------------------------


def test_identity_fallback_is_encoded_only_when_true() -> None:
    assert "identity_fallback" not in enc.unpack(ARRANGEMENT.encoded)
    assert Arrangement.decode(ARRANGEMENT.encoded) == ARRANGEMENT
    assert enc.unpack(FALLBACK.encoded)["identity_fallback"] is True
    assert Arrangement.decode(FALLBACK.encoded).identity_fallback is True
    assert FALLBACK.id != ARRANGEMENT.id
    explicit_false = enc.pack({**enc.unpack(ARRANGEMENT.encoded), "identity_fallback": False})
    with pytest.raises(ProtocolError):
        Arrangement.decode(explicit_false)
    with pytest.raises(UsageError):
        dataclasses.replace(ARRANGEMENT, identity_fallback=1)
    assert FALLBACK.amend(scopes=("missile",)).identity_fallback is True


def test_a_signed_prekeys_signature_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # An originator wraps every token of a recipient to the same signed prekey: its
    # Ed25519 check is made once (issue 11). Owner, kind and expiry are still checked on
    # every call; a one-time prekey (used once) is checked every time.
    calls: list[bytes] = []
    real = tisa.prekeys.verify

    def counting(key: Any, context: Any, body: bytes, signature: bytes) -> None:
        calls.append(body)
        real(key, context, body, signature)

    monkeypatch.setattr(tisa.prekeys, "verify", counting)
    monkeypatch.setattr(tisa.prekeys, "_VERIFIED_SIGNED", {})
    ring = Keyring()
    signed = ring.make(PrekeyKind.SIGNED)
    for _ in range(5):
        Prekey.verify(signed, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)
    assert len(calls) == 1
    with pytest.raises(Refused) as info:
        Prekey.verify(signed, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW + 7200)
    assert info.value.reason is Reason.EXPIRED
    with pytest.raises(Refused):
        Prekey.verify(signed, ARRANGEMENT, owner="seoul", kind=PrekeyKind.SIGNED, now=NOW)
    # The same body under another signature is checked (and refused).
    outer = enc.unpack(signed)
    forged = enc.pack({"body": outer["body"], "sig": bytes(64)})
    with pytest.raises(VerificationError):
        Prekey.verify(forged, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)
    assert len(calls) == 2
    one_time = ring.make(PrekeyKind.ONE_TIME)
    for _ in range(3):
        Prekey.verify(one_time, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.ONE_TIME, now=NOW)
    assert len(calls) == 5


def test_the_verified_prekeys_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tisa.prekeys, "_VERIFIED_SIGNED", {})
    monkeypatch.setattr(tisa.prekeys, "MAX_VERIFIED_SIGNED_PREKEYS", 3)
    ring = Keyring()
    for _ in range(5):
        data = ring.make(PrekeyKind.SIGNED)
        Prekey.verify(data, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)
    assert len(tisa.prekeys._VERIFIED_SIGNED) == 3
