"""Checklist items of the security suite that live in the core (see docs/security.md).

Where tests/test_report.py, test_token.py, test_handshake.py or test_shared_vectors.py
already prove an item, this file adds what they leave out (what else the relay sees, one
error across every failure of opening, scale, the hostile originator) and the table in
docs/security.md names both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hypothesis.strategies as st
import nacl.bindings as sodium
import nacl.exceptions
import pytest
from hypothesis import given, settings

from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.handshake import MemberHandshake, RelayHandshake
from tisa.keys import Context, EncryptionPublicKey, PublicIdentity
from tisa.messages import Chunk, Deliver, SubmitBegin, encode_message
from tisa.report import HEADER_BYTES, MIN_PADDED, ReportSealer, ciphertext_size, open_report
from tisa.token import ReleaseToken
from tisa_testing import hostile
from tisa_testing.model import CoreRecipient, CounterGaps
from tisa_testing.world import LEVEL, SCOPE, World, make_world

WORLD = make_world(third_party=True)

# --- length leaks --------------------------------------------------------------------------


def _relay_view(world: World, body: bytes, **seal: Any) -> tuple[int, ...]:
    """Every length the relay sees for one report: submit message, chunk messages,
    ciphertext, token, deliver message."""
    report = world.seal(body, **seal)
    token = world.token(report, counter=1)
    chunks = [
        len(encode_message(Chunk(data=report.ciphertext[i : i + 65553])))
        for i in range(0, report.size, 65553)
    ]
    submit = SubmitBegin(report=report.report_id, size=report.size, digest=report.digest, expires=1)
    return (
        report.size,
        len(encode_message(submit)),
        *chunks,
        len(token),
        len(encode_message(Deliver(token=token))),
    )


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=700), st.binary(max_size=700))
def test_relay_sees_the_same_lengths_for_any_content_in_a_bucket(a: bytes, b: bytes) -> None:
    # tests/test_report.py proves the ciphertext length is a function of the bucket; here
    # every length the relay handles (messages, chunks, token) is the same too.
    assert _relay_view(WORLD, a) == _relay_view(WORLD, b)


def test_metadata_inside_the_report_hides_in_the_bucket() -> None:
    # One recipient or three, no attachment or two with long names, a short or long
    # body: all under the minimum bucket look the same to the relay.
    plain = _relay_view(WORLD, b"")
    many = _relay_view(
        WORLD,
        b"x" * 300,
        recipients=("tokyo", "canberra"),
        attachments=(("a" * 100, b"1" * 50), ("b" * 100, b"")),
    )
    assert plain[0] == many[0] == ciphertext_size(MIN_PADDED)
    assert plain[:3] == many[:3]


def test_bucket_count_is_logarithmic() -> None:
    # PADME: at most ~12% overhead and O(log log n) bits of length leaked. Count the
    # distinct ciphertext lengths for every plaintext from 1 byte to 1 MiB.
    from tisa.report import padded_size

    sizes = {padded_size(n) for n in range(1, 2**20 + 1)}
    for exponent in range(10, 20):
        octave = [s for s in sizes if 2**exponent <= s < 2 ** (exponent + 1)]
        # Within [2^E, 2^(E+1)) only the top bit_length(E)+1 bits vary: 2^bit_length(E)
        # buckets, that is at most log2(2E) bits of length information.
        assert len(octave) <= 2 ** exponent.bit_length()
    assert len(sizes) <= 240
    assert all(padded_size(n) <= max(MIN_PADDED, n * 1.12) for n in range(1, 2**20, 997))


# --- error oracle --------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    token: bytes
    ciphertext: bytes


def _opening_failures(world: World) -> list[Case]:
    report = world.seal(b"a report that must not be readable", attachments=[("a", b"b" * 10)])
    token = world.token(report)
    ct = report.ciphertext
    secret = world.secrets["seoul"]
    cases = [
        Case("token signature flipped", hostile.flip_bit(token, 8 * (len(token) - 3)), ct),
        Case(
            "token resigned by another member",
            hostile.resign_envelope(token, world.secrets["canberra"], Context.TOKEN),
            ct,
        ),
        Case("token malleated", hostile.malleate_envelope(token), ct),
    ]
    forge = dict(
        recipient="tokyo",
        report_id=report.report_id,
        digest_=report.digest,
        size=report.size,
        scope=SCOPE,
        level=LEVEL,
        not_before=world.now - 10,
        not_after=world.now + 60,
        originator="seoul",
        signed_prekey=world.signed_prekey_key("tokyo"),
    )
    cases += [
        Case(
            "key sealed to someone else",
            hostile.forge_token(
                secret,
                world.arrangement,
                content_key=report.content_key,
                sealed_to=world.secrets["canberra"].public.encryption,
                **forge,
            ),
            ct,
        ),
        Case(
            "key commitment mismatch",
            hostile.forge_token(
                secret,
                world.arrangement,
                content_key=bytes(32),
                key_commit=hostile.key_commitment(report.content_key, report.report_id),
                **forge,
            ),
            ct,
        ),
        Case(
            "wrong key, matching commitment",
            hostile.forge_token(secret, world.arrangement, content_key=bytes(32), **forge),
            ct,
        ),
    ]
    for position in (
        0,
        HEADER_BYTES - 1,
        HEADER_BYTES,
        HEADER_BYTES + 40,
        len(ct) - 17,
        len(ct) - 1,
    ):
        cases.append(
            Case(f"ciphertext bit at {position}", token, hostile.flip_bit(ct, 8 * position))
        )
    cases += [
        Case("ciphertext truncated", token, ct[:-1]),
        Case("ciphertext extended", token, ct + b"\0"),
        Case("ciphertext of another report", token, world.seal(b"other").ciphertext),
        Case("empty ciphertext", token, b""),
    ]

    def rewritten(name: str, transform: Any, **changes: Any) -> None:
        forged = hostile.rewrite_report(report, transform, **changes)
        cases.append(Case(name, world.token(forged), forged.ciphertext))

    def resigned(header_edit: Any) -> Any:
        def transform(h: bytes, s: bytes, rest: bytes) -> tuple[bytes, bytes, bytes]:
            fields = enc.unpack(h)
            header_edit(fields)
            new = enc.pack(fields)
            return new, secret.sign(Context.REPORT, new), rest

        return transform

    rewritten("inner signature flipped", lambda h, s, r: (h, hostile.flip_bit(s, 3), r))
    rewritten(
        "inner signature by another member",
        lambda h, s, r: (h, world.secrets["tokyo"].sign(Context.REPORT, h), r),
    )
    rewritten("inner header names another report", resigned(lambda f: f.update(id=bytes(16))))
    rewritten(
        "inner header names another originator", resigned(lambda f: f.update(originator="tokyo"))
    )
    rewritten("inner header names another scope", resigned(lambda f: f.update(scope="nk.nuclear")))
    rewritten(
        "inner header not canonical",
        lambda h, s, r: (
            hostile.loose_pack(enc.unpack(h), widen=frozenset({"str"})),
            secret.sign(
                Context.REPORT, hostile.loose_pack(enc.unpack(h), widen=frozenset({"str"}))
            ),
            r,
        ),
    )
    rewritten("padding not zero", lambda h, s, r: (h, s, r[:-1] + b"\x01"))
    rewritten("content shorter than declared", lambda h, s, r: (h, s, r[:20]))
    rewritten("header length prefix too large", lambda h, s, r: (h + s + r, b"", b""))
    return cases


def test_every_cryptographic_failure_of_opening_is_one_opaque_error() -> None:
    # tests/test_report.py and test_token.py check opacity per module; here all the
    # ways opening can fail, from the token to the padding, raise exactly the same error.
    seen: set[tuple[type[BaseException], str, tuple[Any, ...]]] = set()
    cases = _opening_failures(WORLD)
    assert len(cases) > 20
    for case in cases:
        with pytest.raises(VerificationError) as caught:
            release = WORLD.check(case.token, "tokyo")
            open_report(case.ciphertext, release.opener(WORLD.arrangement))
        error = caught.value
        seen.add((type(error), str(error), error.args))
        # Nothing of the cause travels with it: no chained exception, no traceback note.
        assert error.__cause__ is None, case.name
        assert error.__suppress_context__ or error.__context__ is None, case.name
        assert not getattr(error, "__notes__", None), case.name
    assert seen == {(VerificationError, "verification failed", ("verification failed",))}


# --- nonce and header uniqueness ----------------------------------------------------------


def test_no_nonce_repeats_over_many_seals() -> None:
    # tests/test_report.py checks 200 seals; here 2000 seals and tokens, every random
    # value the sealing path draws: report id, content key, secretstream header (its
    # nonce), the key wrap's ephemeral key, the token id.
    count = 2000
    ids, keys, headers, ephemerals, token_ids = set(), set(), set(), set(), set()
    for _ in range(count):
        report = WORLD.seal(b"the same body every time")
        token = ReleaseToken.decode(WORLD.token(report, counter=1))
        ids.add(report.report_id)
        keys.add(report.content_key)
        headers.add(report.ciphertext[:HEADER_BYTES])
        ephemerals.add(token.wrap.eph)
        token_ids.add(token.id)
    for values in (ids, keys, headers, ephemerals, token_ids):
        assert len(values) == count


def test_no_handshake_value_repeats() -> None:
    count = 300
    seen: dict[str, set[bytes]] = {
        k: set() for k in ("m_eph", "m_nonce", "r_eph", "r_nonce", "r_stream", "m_stream")
    }
    for _ in range(count):
        member = MemberHandshake(WORLD.secrets["seoul"], "seoul", WORLD.arrangement)
        relay = RelayHandshake(WORLD.secrets["washington"], WORLD.arrangement)
        hello = enc.unpack(member.start())
        welcome_bytes = relay.receive(enc.pack(hello))
        assert welcome_bytes is not None
        welcome = enc.unpack(welcome_bytes)
        finish = enc.unpack(member.receive(welcome_bytes))
        seen["m_eph"].add(hello["eph"])
        seen["m_nonce"].add(hello["nonce"])
        seen["r_eph"].add(welcome["eph"])
        seen["r_nonce"].add(welcome["nonce"])
        seen["r_stream"].add(welcome["stream"])
        seen["m_stream"].add(finish["stream"])
    assert all(len(values) == count for values in seen.values())


def test_fixed_key_and_id_never_repeat_a_keystream() -> None:
    # Even a sealer handed a fixed key and id (the vector generator does) draws a fresh
    # secretstream header, so two seals never share a keystream.
    headers = set()
    for _ in range(200):
        sealer = ReportSealer(
            WORLD.secrets["seoul"],
            "seoul",
            WORLD.arrangement,
            recipients=["tokyo"],
            scope=SCOPE,
            level=LEVEL,
            body_size=0,
            now=WORLD.now,
            _report_id=bytes(16),
            _content_key=bytes(range(32)),
        )
        headers.add(sealer.start()[:HEADER_BYTES])
    assert len(headers) == 200


# --- key commitment ------------------------------------------------------------------------


def test_a_ciphertext_opens_under_one_committed_key_only() -> None:
    # A hostile originator issues two valid tokens for one ciphertext, each committing
    # to its own key: at most one of them opens it, and the other fails opaquely.
    world = WORLD
    report = world.seal(b"the one true plaintext")
    good = world.token(report, "tokyo")
    other_key = bytes(range(32))
    bad = world.token(report, "canberra", content_key=other_key)
    assert world.check(bad, "canberra").content_key == other_key  # the token is valid
    opened = open_report(report.ciphertext, world.check(good, "tokyo").opener(world.arrangement))
    assert opened.body == b"the one true plaintext"
    with pytest.raises(VerificationError):
        open_report(report.ciphertext, world.check(bad, "canberra").opener(world.arrangement))


def test_two_tokens_two_keys_never_two_plaintexts() -> None:
    # Sealed twice under two keys with the same report id, a ciphertext of one never
    # opens under the other's token: the digest in each token pins its ciphertext.
    world = WORLD
    report = world.seal(b"first")
    twin = hostile.rewrite_report(report, lambda h, s, r: (h, s, r), content_key=bytes(range(32)))
    assert twin.ciphertext != report.ciphertext
    for token, ciphertext in (
        (world.token(report), twin.ciphertext),
        (world.token(twin), report.ciphertext),
    ):
        with pytest.raises(VerificationError):
            open_report(ciphertext, world.check(token).opener(world.arrangement))


# --- low-order X25519 keys ---------------------------------------------------------------

P = 2**255 - 19
_LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]
LOW_ORDER_POINTS = [v.to_bytes(32, "little") for v in _LOW_ORDER] + [
    (v + 2**255).to_bytes(32, "little") for v in _LOW_ORDER if v < 2**255
]


def test_the_low_order_list_is_low_order() -> None:
    for point in LOW_ORDER_POINTS:
        with pytest.raises(nacl.exceptions.RuntimeError):
            sodium.crypto_scalarmult(bytes(range(1, 33)), point)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8] + p.hex()[-4:])
def test_low_order_x25519_keys_are_refused_everywhere(point: bytes) -> None:
    # tests/test_shared_vectors.py runs Wycheproof's low-order keys through the key type
    # and the hello; here the same list also reaches an arrangement file and the relay's
    # welcome, signed by the real relay.
    with pytest.raises(UsageError):
        EncryptionPublicKey(point)
    identity = {"sign": WORLD.secrets["seoul"].public.signing.raw, "box": point}
    with pytest.raises(ProtocolError):
        PublicIdentity.from_dict(identity)
    members = enc.unpack(WORLD.arrangement.encoded)
    members["members"][0]["identity"]["box"] = point
    with pytest.raises(ProtocolError):
        Arrangement.decode(enc.pack(members))
    relay = RelayHandshake(WORLD.secrets["washington"], WORLD.arrangement)
    with pytest.raises(ProtocolError):
        relay.receive(
            hostile.ImpostorMember(WORLD.secrets["seoul"], "seoul", WORLD.arrangement).start(
                eph=point
            )
        )
    member = MemberHandshake(WORLD.secrets["seoul"], "seoul", WORLD.arrangement)
    welcome = hostile.ImpostorRelay(WORLD.secrets["washington"], WORLD.arrangement).receive(
        member.start(), eph=point
    )
    with pytest.raises(ProtocolError):
        member.receive(welcome)


# --- release counter gaps ------------------------------------------------------------------


def test_counter_gaps_in_order_out_of_order_and_replayed() -> None:
    gaps = CounterGaps()
    assert gaps.record("seoul", 1) == []
    assert gaps.record("seoul", 2) == []
    assert gaps.record("seoul", 5) == [3, 4]
    assert gaps.gaps("seoul") == {3, 4}
    assert gaps.record("seoul", 4) == []  # late: closes its gap
    assert gaps.gaps("seoul") == {3}
    assert gaps.record("seoul", 5) == []  # replay: nothing new
    assert gaps.record("tokyo", 2) == [1]  # per originator
    assert gaps.gaps("seoul") == {3} and gaps.gaps("tokyo") == {1}
    assert gaps.highest("seoul") == 5 and gaps.highest("canberra") == 0


def test_a_release_the_relay_dropped_is_noticed() -> None:
    world = make_world(third_party=True)
    tokyo = CoreRecipient(
        world.arrangement,
        world.secrets["tokyo"],
        "tokyo",
        prekey_secret=world.prekey_lookup("tokyo"),
    )
    reports = [world.seal(f"report {i}".encode()) for i in range(4)]
    tokens = [world.token(r, "tokyo") for r in reports]  # counters 1..4
    first = tokyo.receive(tokens[0], reports[0].ciphertext, now=world.now)
    assert first.gaps == ()
    # The relay drops releases 2 and 3 and forwards 4.
    fourth = tokyo.receive(tokens[3], reports[3].ciphertext, now=world.now)
    assert fourth.gaps == (2, 3)
    assert tokyo.store.counters.gaps("seoul") == {2, 3}
    # Release 3 turns up late; replaying 4 changes nothing and is refused.
    tokyo.receive(tokens[2], reports[2].ciphertext, now=world.now)
    assert tokyo.store.counters.gaps("seoul") == {2}
    with pytest.raises(Refused) as caught:
        tokyo.receive(tokens[3], reports[3].ciphertext, now=world.now)
    assert caught.value.reason is Reason.REPLAYED
    # After a restart the gap is still known.
    restarted = CoreRecipient(
        world.arrangement,
        world.secrets["tokyo"],
        "tokyo",
        tokyo.store,
        prekey_secret=world.prekey_lookup("tokyo"),
    )
    assert restarted.store.counters.gaps("seoul") == {2}


def test_a_forged_counter_cannot_close_a_gap() -> None:
    # The relay edits the counter of a token it holds to fill the gap: the signature
    # covers the counter, so the edit fails and the gap stays.
    world = make_world(third_party=True)
    tokyo = CoreRecipient(
        world.arrangement,
        world.secrets["tokyo"],
        "tokyo",
        prekey_secret=world.prekey_lookup("tokyo"),
    )
    reports = [world.seal(f"report {i}".encode()) for i in range(3)]
    tokens = [world.token(r, "tokyo") for r in reports]
    tokyo.receive(tokens[0], reports[0].ciphertext, now=world.now)
    tokyo.receive(tokens[2], reports[2].ciphertext, now=world.now)
    body, signature = hostile.envelope_parts(tokens[2])
    fields = enc.unpack(body)
    fields["counter"] = 2
    edited = enc.pack({"body": enc.pack(fields), "sig": signature})
    with pytest.raises(VerificationError):
        tokyo.receive(edited, reports[2].ciphertext, now=world.now)
    assert tokyo.store.counters.gaps("seoul") == {2}
