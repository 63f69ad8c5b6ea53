"""Domain separation: no signed object of one kind is ever accepted as another.

Two matrices over every signed kind (token, receipt, ack, audit checkpoint, arrangement
signature, the report's inner signature, and both handshake signatures):

* every kind's valid encoding fed to every other kind's verifier is refused;
* a body that is valid for kind B, signed by the right key but under kind A's context
  label, fails B's verification for every A other than B (and passes for A = B, which
  shows the forgery is otherwise perfect).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from conftest import make_trio

from tisa import encoding as enc
from tisa.arrangement import SignedArrangement
from tisa.audit import Checkpoint
from tisa.consent import Announcement, Answer, Request
from tisa.errors import ProtocolError, RemoteError, VerificationError
from tisa.handshake import MemberHandshake, RelayHandshake
from tisa.keys import Context, MemberSecret, verify
from tisa.prekeys import Prekey, PrekeyKind, PrekeySecret
from tisa.receipt import Receipt, StoredAck
from tisa.report import ReportOpener, SealedReport, open_report, seal_report
from tisa.token import check_for_recipient, check_for_relay, issue_token

ARRANGEMENT, SECRETS = make_trio()
NOW = 1_420_000_000


class ContextSwap(MemberSecret):
    """A member's real keys, signing everything under one fixed context instead."""

    __slots__ = ("_use",)

    def __init__(self, secret: MemberSecret, use: Context) -> None:
        super().__init__(sign_seed=secret._seed, box_secret=secret._box_secret)
        self._use = use

    def sign(self, context: Context, message: bytes) -> bytes:
        return super().sign(self._use, message)


def signer(name: str, context: Context | None) -> MemberSecret:
    secret = SECRETS[name]
    return secret if context is None else ContextSwap(secret, context)


def resign(data: bytes, secret: MemberSecret, context: Context) -> bytes:
    body = enc.unpack(data)["body"]
    return enc.pack({"body": body, "sig": secret.sign(context, body)})


# --- one valid object of each kind -------------------------------------------------------


def make_report(context: Context | None = None) -> SealedReport:
    return seal_report(
        signer("seoul", context),
        "seoul",
        ARRANGEMENT,
        recipients=["tokyo"],
        scope="missile",
        level="secret",
        body=b"cross-kind",
        now=NOW,
    )


REPORT = make_report()
SIGNED_PREKEY = PrekeySecret(
    kind=PrekeyKind.SIGNED, secret=bytes(range(32)), created=NOW - 60, not_after=NOW + 7200
)


def make_prekey(context: Context | None = None) -> bytes:
    prekey = SIGNED_PREKEY.publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT)
    return prekey if context is None else resign(prekey, SECRETS["tokyo"], context)


def verify_prekey(data: bytes) -> None:
    Prekey.verify(data, ARRANGEMENT, owner="tokyo", kind=PrekeyKind.SIGNED, now=NOW)


def tokyos_prekey(kind: PrekeyKind, public: bytes) -> bytes:
    assert public == SIGNED_PREKEY.public
    return SIGNED_PREKEY.secret


def make_token(context: Context | None = None) -> bytes:
    token = issue_token(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        recipient="tokyo",
        report_id=REPORT.report_id,
        digest=REPORT.digest,
        size=REPORT.size,
        content_key=REPORT.content_key,
        scope="missile",
        level="secret",
        not_before=NOW,
        not_after=NOW + 3600,
        counter=1,
        signed_prekey=make_prekey(),
    )
    return token if context is None else resign(token, SECRETS["seoul"], context)


def make_receipt(context: Context | None = None) -> bytes:
    receipt = Receipt.issue(
        SECRETS["tokyo"],
        ARRANGEMENT,
        report=REPORT.report_id,
        token=bytes(16),
        originator="seoul",
        recipient="tokyo",
        digest=REPORT.digest,
        received=NOW,
    ).encoded
    return receipt if context is None else resign(receipt, SECRETS["tokyo"], context)


def make_ack(context: Context | None = None) -> bytes:
    ack = StoredAck.issue(
        SECRETS["washington"],
        ARRANGEMENT,
        report=REPORT.report_id,
        originator="seoul",
        digest=REPORT.digest,
        size=REPORT.size,
        stored=NOW,
    ).encoded
    return ack if context is None else resign(ack, SECRETS["washington"], context)


def make_checkpoint(context: Context | None = None) -> bytes:
    checkpoint = Checkpoint.issue(
        SECRETS["washington"], ARRANGEMENT, seq=1, head=bytes(32), time=NOW
    ).encoded
    return checkpoint if context is None else resign(checkpoint, SECRETS["washington"], context)


def make_arrangement(context: Context | None = None) -> bytes:
    # Built by hand: SignedArrangement checks every signature it is given.
    signatures = {
        name: signer(name, context).sign(Context.ARRANGEMENT, ARRANGEMENT.id) for name in SECRETS
    }
    return enc.pack({"arrangement": ARRANGEMENT.encoded, "signatures": signatures})


def make_announcement(context: Context | None = None) -> bytes:
    data = Announcement.issue(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        report=REPORT.report_id,
        to=["tokyo"],
        scope="missile",
        level="secret",
        size=REPORT.size,
        title="cross-kind",
        now=NOW,
    ).encoded
    return data if context is None else resign(data, SECRETS["seoul"], context)


REQUEST = Request.issue(
    SECRETS["tokyo"],
    "tokyo",
    ARRANGEMENT,
    originator="seoul",
    report=REPORT.report_id,
    purpose="cross-kind",
    now=NOW,
    valid_for=3600,
)


def make_request(context: Context | None = None) -> bytes:
    data = REQUEST.encoded
    return data if context is None else resign(data, SECRETS["tokyo"], context)


def make_answer(context: Context | None = None) -> bytes:
    data = Answer.deny(
        SECRETS["seoul"], "seoul", ARRANGEMENT, REQUEST, reason="denied", now=NOW
    ).encoded
    return data if context is None else resign(data, SECRETS["seoul"], context)


@dataclasses.dataclass
class Handshake:
    hello: bytes
    welcome: bytes
    finish: bytes


def run_handshake(relay_secret: MemberSecret, member_secret: MemberSecret) -> Handshake:
    member = MemberHandshake(member_secret, "seoul", ARRANGEMENT)
    relay = RelayHandshake(relay_secret, ARRANGEMENT)
    hello = member.start()
    welcome = relay.receive(hello)
    assert welcome is not None
    finish = member.receive(welcome)
    assert relay.receive(finish) is None
    return Handshake(hello, welcome, finish)


HANDSHAKE = run_handshake(SECRETS["washington"], SECRETS["seoul"])


# --- verifiers ---------------------------------------------------------------------------


def verify_token(data: bytes) -> None:
    check_for_relay(
        data,
        ARRANGEMENT,
        report_id=REPORT.report_id,
        digest=REPORT.digest,
        size=REPORT.size,
        originator="seoul",
        now=NOW,
    )
    check_for_recipient(
        data, ARRANGEMENT, SECRETS["tokyo"], "tokyo", now=NOW, prekey_secret=tokyos_prekey
    )


def verify_receipt(data: bytes) -> None:
    Receipt.verify(data, ARRANGEMENT)


def verify_ack(data: bytes) -> None:
    StoredAck.verify(data, ARRANGEMENT)


def verify_checkpoint(data: bytes) -> None:
    Checkpoint.verify(data, ARRANGEMENT)


def verify_arrangement(data: bytes) -> None:
    SignedArrangement.load_effective(data)


def verify_report(data: bytes, report: SealedReport = REPORT) -> None:
    opener = ReportOpener(
        content_key=report.content_key,
        report_id=report.report_id,
        digest=report.digest,
        size=report.size,
        arrangement=ARRANGEMENT,
        recipient="tokyo",
        originator="seoul",
        scope="missile",
        level="secret",
    )
    open_report(data, opener)


def verify_welcome(data: bytes) -> None:
    member = MemberHandshake(SECRETS["seoul"], "seoul", ARRANGEMENT)
    member.start()
    member.receive(data)


def verify_finish(data: bytes) -> None:
    member = MemberHandshake(SECRETS["seoul"], "seoul", ARRANGEMENT)
    relay = RelayHandshake(SECRETS["washington"], ARRANGEMENT)
    relay.receive(member.start())
    relay.receive(data)


def verify_announcement(data: bytes) -> None:
    Announcement.verify(data, ARRANGEMENT)


def verify_request(data: bytes) -> None:
    Request.verify(data, ARRANGEMENT)


def verify_answer(data: bytes) -> None:
    Answer.verify(data, ARRANGEMENT)


def verify_hello(data: bytes) -> None:
    RelayHandshake(SECRETS["washington"], ARRANGEMENT).receive(data)


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    context: Context
    valid: Callable[[], bytes]
    verifier: Callable[[bytes], None]


KINDS = [
    Kind("token", Context.TOKEN, make_token, verify_token),
    Kind("prekey", Context.PREKEY, make_prekey, verify_prekey),
    Kind("receipt", Context.RECEIPT, make_receipt, verify_receipt),
    Kind("ack", Context.ACK, make_ack, verify_ack),
    Kind("checkpoint", Context.AUDIT, make_checkpoint, verify_checkpoint),
    Kind("arrangement", Context.ARRANGEMENT, make_arrangement, verify_arrangement),
    Kind("report", Context.REPORT, lambda: REPORT.ciphertext, verify_report),
    Kind("handshake-relay", Context.HANDSHAKE_RELAY, lambda: HANDSHAKE.welcome, verify_welcome),
    Kind("handshake-member", Context.HANDSHAKE_MEMBER, lambda: HANDSHAKE.finish, verify_finish),
    Kind("announcement", Context.ANNOUNCE, make_announcement, verify_announcement),
    Kind("request", Context.REQUEST, make_request, verify_request),
    Kind("answer", Context.ANSWER, make_answer, verify_answer),
]
KIND_IDS = [k.name for k in KINDS]


def test_every_context_has_a_kind() -> None:
    assert {k.context for k in KINDS} == set(Context)
    assert len({c.value for c in Context}) == len(Context)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_each_kind_verifies_as_itself(kind: Kind) -> None:
    data, verifier = forged_under(kind.name, None)
    verifier(data)


# The unsigned hello is accepted by a relay: it is a valid first message, not a signed one.
VERIFIERS = [(k.name, k.verifier) for k in KINDS] + [("handshake-hello", verify_hello)]


@pytest.mark.parametrize(
    ("kind", "verifier"),
    [(k, v) for k in KINDS for name, v in VERIFIERS if name != k.name],
    ids=[f"{k.name}-as-{name}" for k in KINDS for name, _ in VERIFIERS if name != k.name],
)
def test_every_kind_refused_by_every_other_verifier(
    kind: Kind, verifier: Callable[[bytes], None]
) -> None:
    data = kind.valid()
    with pytest.raises(RemoteError):
        verifier(data)


# --- a valid body under the wrong context label ------------------------------------------


def forged_under(kind: str, context: Context | None) -> tuple[bytes, Callable[[bytes], None]]:
    """A ``kind`` object signed by the right key but under ``context`` (None: its own),
    and a verifier for it (for a handshake, the other side of the same session)."""
    if kind == "token":
        return make_token(context), verify_token
    if kind == "prekey":
        return make_prekey(context), verify_prekey
    if kind == "receipt":
        return make_receipt(context), verify_receipt
    if kind == "ack":
        return make_ack(context), verify_ack
    if kind == "checkpoint":
        return make_checkpoint(context), verify_checkpoint
    if kind == "arrangement":
        return make_arrangement(context), verify_arrangement
    if kind == "report":
        report = make_report(context)
        return report.ciphertext, lambda data: verify_report(data, report)
    if kind == "announcement":
        return make_announcement(context), verify_announcement
    if kind == "request":
        return make_request(context), verify_request
    if kind == "answer":
        return make_answer(context), verify_answer
    if kind == "handshake-relay":
        return forged_welcome(signer("washington", context))
    if kind == "handshake-member":
        return forged_finish(signer("seoul", context))
    raise AssertionError(kind)


def forged_welcome(relay_secret: MemberSecret) -> tuple[bytes, Callable[[bytes], None]]:
    # The handshake binds its signatures to one session's transcript, so the forged
    # message goes to the member of that same session.
    member = MemberHandshake(SECRETS["seoul"], "seoul", ARRANGEMENT)
    welcome = RelayHandshake(relay_secret, ARRANGEMENT).receive(member.start())
    assert welcome is not None

    def verifier(data: bytes) -> None:
        member.receive(data)

    return welcome, verifier


def forged_finish(member_secret: MemberSecret) -> tuple[bytes, Callable[[bytes], None]]:
    member = MemberHandshake(member_secret, "seoul", ARRANGEMENT)
    relay = RelayHandshake(SECRETS["washington"], ARRANGEMENT)
    welcome = relay.receive(member.start())
    assert welcome is not None

    def verifier(data: bytes) -> None:
        relay.receive(data)

    return member.receive(welcome), verifier


@pytest.mark.parametrize("context", list(Context), ids=[c.value.decode() for c in Context])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_valid_body_signed_under_another_context_fails(kind: Kind, context: Context) -> None:
    data, verifier = forged_under(kind.name, context)
    if context is kind.context:
        verifier(data)  # the forgery is perfect but for the label
        return
    with pytest.raises(VerificationError) as info:
        verifier(data)
    assert type(info.value) is VerificationError


# --- the raw signatures ------------------------------------------------------------------


def test_signature_of_one_context_never_verifies_in_another() -> None:
    message = b"the same bytes, whatever kind they claim to be"
    for secret in SECRETS.values():
        for signed_as in Context:
            signature = secret.sign(signed_as, message)
            for checked_as in Context:
                if checked_as is signed_as:
                    verify(secret.public.signing, checked_as, message, signature)
                else:
                    with pytest.raises(VerificationError):
                        verify(secret.public.signing, checked_as, message, signature)


def test_context_labels_are_not_prefixes_of_each_other() -> None:
    # The label is followed by a newline, so "handshake-relay" cannot be read as
    # "handshake" plus a message starting "-relay"; check no label ends with it either.
    labels = [c.value for c in Context]
    assert all(b"\n" not in label for label in labels)
    for a in labels:
        for b in labels:
            if a != b:
                assert not (a + b"\n").startswith(b + b"\n")


def test_envelope_kinds_refuse_each_others_signatures() -> None:
    # Same signer (the relay) for ack and checkpoint: even moving one kind's signature
    # onto the other's body fails, whatever the bodies say.
    ack, checkpoint = enc.unpack(make_ack()), enc.unpack(make_checkpoint())
    swapped = enc.pack({"body": checkpoint["body"], "sig": ack["sig"]})
    with pytest.raises(VerificationError):
        verify_checkpoint(swapped)
    swapped = enc.pack({"body": ack["body"], "sig": checkpoint["sig"]})
    with pytest.raises(VerificationError):
        verify_ack(swapped)
    with pytest.raises(ProtocolError):
        verify_ack(make_checkpoint())
