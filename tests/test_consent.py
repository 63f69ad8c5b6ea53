"""The consent objects (announcement, request, denial), the token's request field, and
the acceptance rules that refuse replayed, reflected and re-targeted requests and answers."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import make_trio
from hypothesis import given
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role
from tisa.consent import (
    DENIAL_REASONS,
    MAX_NOTE,
    MAX_PURPOSE,
    MAX_REQUEST_VALIDITY,
    MAX_TITLE,
    Announcement,
    Answer,
    Request,
    check_answer,
    check_approval,
    check_incoming_request,
    size_bucket,
)
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import Context, MemberSecret
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.token import ReleaseToken, check_for_recipient, issue_token

ARRANGEMENT, SECRETS = make_trio()
NOW = 1_420_000_000
REPORT = bytes(range(16))
REQUEST_ID = bytes([7]) * 16


def make_request(**changes: object) -> Request:
    args: dict[str, object] = {
        "originator": "seoul",
        "report": REPORT,
        "purpose": "assess the launch of 2014-03-26",
        "now": NOW,
        "valid_for": 3600,
        "_id": REQUEST_ID,
    }
    args.update(changes)
    return Request.issue(SECRETS["tokyo"], "tokyo", ARRANGEMENT, **args)  # type: ignore[arg-type]


def deny(request: Request, reason: str = "denied", note: str = "") -> Answer:
    return Answer.deny(
        SECRETS["seoul"], "seoul", ARRANGEMENT, request, reason=reason, note=note, now=NOW + 5
    )


def announce(**changes: object) -> Announcement:
    args: dict[str, object] = {
        "report": REPORT,
        "to": ["tokyo"],
        "scope": "missile",
        "level": "secret",
        "size": 5000,
        "title": "Musudan test",
        "now": NOW,
    }
    args.update(changes)
    return Announcement.issue(SECRETS["seoul"], "seoul", ARRANGEMENT, **args)  # type: ignore[arg-type]


def resign_body(data: bytes, secret: MemberSecret, context: Context, **changes: object) -> bytes:
    """The object with body fields changed, signed again by ``secret`` (a valid signature)."""
    body = enc.unpack(enc.unpack(data)["body"])
    body.update(changes)
    packed = enc.pack(body)
    return enc.pack({"body": packed, "sig": secret.sign(context, packed)})


# --- round trips ------------------------------------------------------------------------


def test_request_round_trip() -> None:
    request = make_request()
    again = Request.verify(request.encoded, ARRANGEMENT)
    assert again == request
    assert (again.requester, again.originator, again.report) == ("tokyo", "seoul", REPORT)
    assert again.expires == NOW + 3600


def test_answer_round_trip_and_reason_is_typed() -> None:
    answer = deny(make_request(), "level_not_allowed", "not at this level")
    again = Answer.verify(answer.encoded, ARRANGEMENT)
    assert again == answer
    assert again.reason is Reason.LEVEL_NOT_ALLOWED
    assert (again.request, again.requester, again.note) == (
        REQUEST_ID,
        "tokyo",
        "not at this level",
    )


def test_announcement_round_trip_reveals_only_what_it_lists() -> None:
    announcement = announce(to=["tokyo"])
    again = Announcement.verify(announcement.encoded, ARRANGEMENT)
    assert again == announcement
    body = enc.unpack(enc.unpack(announcement.encoded)["body"])
    assert set(body) == {
        "v", "id", "arrangement", "version", "originator", "to", "report", "scope", "level",
        "size_bucket", "title", "time",
    }  # fmt: skip
    assert body["size_bucket"] == 13  # 5000 bytes: at most 2^13


@pytest.mark.parametrize(
    ("size", "bucket"), [(1, 0), (2, 1), (3, 2), (4096, 12), (4097, 13), (4 * 1024**3, 32)]
)
def test_size_bucket(size: int, bucket: int) -> None:
    assert size_bucket(size) == bucket
    assert size <= 2**bucket and (bucket == 0 or size > 2 ** (bucket - 1))


@pytest.mark.parametrize("size", [0, -1, 4 * 1024**3 + 1, True])
def test_size_bucket_refuses_impossible_sizes(size: int) -> None:
    with pytest.raises(UsageError):
        size_bucket(size)


# --- issuing refuses what verifying would ----------------------------------------------


def test_request_limits() -> None:
    make_request(purpose="x" * MAX_PURPOSE)
    with pytest.raises(UsageError):
        make_request(purpose="x" * (MAX_PURPOSE + 1))
    with pytest.raises(UsageError):
        make_request(purpose="")
    make_request(valid_for=MAX_REQUEST_VALIDITY)
    with pytest.raises(UsageError):
        make_request(valid_for=MAX_REQUEST_VALIDITY + 1)
    with pytest.raises(UsageError):
        make_request(valid_for=0)


def test_note_limit() -> None:
    deny(make_request(), note="n" * MAX_NOTE)
    with pytest.raises(UsageError):
        deny(make_request(), note="n" * (MAX_NOTE + 1))


def test_title_limit() -> None:
    announce(title="t" * MAX_TITLE)
    with pytest.raises(UsageError):
        announce(title="t" * (MAX_TITLE + 1))


def test_request_to_a_non_originator_or_to_itself_is_refused() -> None:
    with pytest.raises(Refused) as exc:
        make_request(originator="washington")
    assert exc.value.reason is Reason.WRONG_ROLE
    with pytest.raises(Refused) as exc:
        make_request(originator="tokyo")
    assert exc.value.reason is Reason.WRONG_RECIPIENT


def test_only_denial_codes_deny() -> None:
    request = make_request()
    for reason in DENIAL_REASONS:
        assert deny(request, reason.value).reason is reason
    for bad in ("replayed", "approved", "nonsense"):
        with pytest.raises(UsageError):
            deny(request, bad)
    # A signed answer carrying another code is malformed for every verifier.
    forged = resign_body(deny(request).encoded, SECRETS["seoul"], Context.ANSWER, reason="revoked")
    with pytest.raises(ProtocolError):
        Answer.verify(forged, ARRANGEMENT)


def test_only_the_addressed_originator_denies() -> None:
    with pytest.raises(UsageError):
        Answer.deny(
            SECRETS["tokyo"], "tokyo", ARRANGEMENT, make_request(), reason="denied", now=NOW
        )


def test_announcement_outside_the_arrangement_is_refused() -> None:
    with pytest.raises(Refused) as exc:
        announce(scope="chemical")
    assert exc.value.reason is Reason.OUT_OF_SCOPE
    forged = resign_body(announce().encoded, SECRETS["seoul"], Context.ANNOUNCE, level="top")
    with pytest.raises(Refused) as exc:
        Announcement.verify(forged, ARRANGEMENT)
    assert exc.value.reason is Reason.LEVEL_NOT_ALLOWED


def test_key_of_another_member_is_refused() -> None:
    with pytest.raises(UsageError):
        Request.issue(
            SECRETS["seoul"], "tokyo", ARRANGEMENT, originator="seoul", report=REPORT,
            purpose="p", now=NOW, valid_for=60,
        )  # fmt: skip


# --- forgery and tampering --------------------------------------------------------------


def test_request_signed_by_someone_else_fails_opaquely() -> None:
    # Seoul signs a request that names Tokyo as requester: the signature is checked with
    # Tokyo's key and fails, with no detail.
    forged = resign_body(make_request().encoded, SECRETS["seoul"], Context.REQUEST)
    with pytest.raises(VerificationError):
        Request.verify(forged, ARRANGEMENT)


def test_request_in_the_name_of_a_non_member_fails_opaquely() -> None:
    forged = resign_body(
        make_request().encoded, SECRETS["tokyo"], Context.REQUEST, requester="pyongyang"
    )
    with pytest.raises(VerificationError):
        Request.verify(forged, ARRANGEMENT)


def test_request_under_another_arrangement_version_is_refused() -> None:
    forged = resign_body(make_request().encoded, SECRETS["tokyo"], Context.REQUEST, version=2)
    with pytest.raises(Refused) as exc:
        Request.verify(forged, ARRANGEMENT)
    assert exc.value.reason is Reason.WRONG_ARRANGEMENT


def test_request_with_bad_window_is_malformed() -> None:
    for expires in (NOW, NOW + MAX_REQUEST_VALIDITY + 1):
        forged = resign_body(
            make_request().encoded, SECRETS["tokyo"], Context.REQUEST, expires=expires
        )
        with pytest.raises(ProtocolError):
            Request.verify(forged, ARRANGEMENT)


@pytest.mark.parametrize("kind", ["request", "answer", "announcement"])
def test_every_byte_flip_is_refused(kind: str) -> None:
    request = make_request()
    data, verifier = {
        "request": (request.encoded, Request.verify),
        "answer": (deny(request).encoded, Answer.verify),
        "announcement": (announce().encoded, Announcement.verify),
    }[kind]
    for position in range(len(data)):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises((ProtocolError, VerificationError, Refused)):
            verifier(bytes(tampered), ARRANGEMENT)


@given(st.binary(max_size=600))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for verifier in (Request.verify, Answer.verify, Announcement.verify):
        with pytest.raises((ProtocolError, VerificationError, Refused)):
            verifier(data, ARRANGEMENT)


# --- the originator's rules for an incoming request -------------------------------------


def incoming(request: Request, name: str = "seoul", **changes: object) -> None:
    args: dict[str, object] = {
        "seen": False,
        "holds_report": True,
        "now": NOW + 10,
        "clock_skew": 120,
    }
    args.update(changes)
    check_incoming_request(request, name, **args)  # type: ignore[arg-type]


def reason_of(call: object, *args: object, **kwargs: object) -> Reason:
    with pytest.raises(Refused) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    return exc.value.reason


def test_incoming_request_accepted() -> None:
    incoming(make_request())


def test_reflected_request_is_refused() -> None:
    # The relay hands Tokyo's own request back to Tokyo.
    assert reason_of(incoming, make_request(), "tokyo") is Reason.REFLECTED


def test_retargeted_request_is_refused() -> None:
    _, _, request = _four_request()
    # Delivered to Canberra, another originator: not addressed to it.
    with pytest.raises(Refused) as exc:
        check_incoming_request(
            request, "canberra", seen=False, holds_report=True, now=NOW, clock_skew=0
        )
    assert exc.value.reason is Reason.WRONG_ORIGINATOR


def test_replayed_expired_and_unknown_requests_are_refused() -> None:
    request = make_request()
    assert reason_of(incoming, request, seen=True) is Reason.REPLAYED
    assert reason_of(incoming, request, now=NOW + 3600 + 120) is Reason.EXPIRED
    incoming(request, now=NOW + 3600 + 119)  # within the clock skew
    assert reason_of(incoming, request, holds_report=False) is Reason.UNKNOWN_REPORT


# --- the requester's rules for an answer and an approval --------------------------------


def test_answer_to_own_request_accepted() -> None:
    request = make_request()
    check_answer(deny(request), "tokyo", request, answered=False)


def test_unsolicited_answer_is_refused() -> None:
    request = make_request()
    assert reason_of(check_answer, deny(request), "tokyo", None, answered=False) is (
        Reason.UNSOLICITED
    )


def test_replayed_answer_is_refused() -> None:
    request = make_request()
    assert reason_of(check_answer, deny(request), "tokyo", request, answered=True) is (
        Reason.REPLAYED
    )


def test_reflected_and_retargeted_answers_are_refused() -> None:
    request = make_request()
    # Seoul's own denial handed back to Seoul.
    assert reason_of(check_answer, deny(request), "seoul", None, answered=False) is (
        Reason.REFLECTED
    )
    arrangement, secrets, request = _four_request()
    answer = Answer.deny(secrets["seoul"], "seoul", arrangement, request, reason="denied", now=NOW)
    # Tokyo's denial delivered to Canberra.
    assert reason_of(check_answer, answer, "canberra", None, answered=False) is (
        Reason.WRONG_RECIPIENT
    )


def test_answer_from_another_originator_is_refused() -> None:
    # Tokyo asked Seoul; Canberra (also an originator) answers the same request id.
    arrangement, secrets, request = _four_request()
    other = dataclasses.replace(request, originator="canberra")
    answer = Answer.deny(
        secrets["canberra"], "canberra", arrangement, other, reason="denied", now=NOW
    )
    Answer.verify(answer.encoded, arrangement)  # authentic: signed by Canberra
    assert reason_of(check_answer, answer, "tokyo", request, answered=False) is (
        Reason.WRONG_ORIGINATOR
    )


def test_answer_naming_another_report_is_refused() -> None:
    request = make_request()
    answer = deny(make_request(report=bytes(16)))
    assert reason_of(check_answer, answer, "tokyo", request, answered=False) is Reason.WRONG_REPORT


# --- the token's request field ----------------------------------------------------------


# Tokyo's signed prekey, which the tokens below wrap their key to.
TOKYO_PREKEY = PrekeySecret.generate(PrekeyKind.SIGNED, created=NOW - 60, not_after=NOW + 86400)


def tokyo_prekey(kind: PrekeyKind, public: bytes) -> bytes:
    assert (kind, public) == (PrekeyKind.SIGNED, TOKYO_PREKEY.public)
    return TOKYO_PREKEY.secret


def token(request: bytes | None, report: bytes = REPORT) -> bytes:
    return issue_token(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        recipient="tokyo",
        report_id=report,
        digest=bytes(32),
        size=1000,
        content_key=bytes(32),
        scope="missile",
        level="secret",
        not_before=NOW,
        not_after=NOW + 60,
        counter=1,
        signed_prekey=TOKYO_PREKEY.publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT),
        request=request,
    )


def test_token_request_field_is_signed_and_absent_by_default() -> None:
    plain = ReleaseToken.decode(token(None))
    assert plain.request is None
    assert "request" not in enc.unpack(plain.body)
    approving = check_for_recipient(
        token(REQUEST_ID),
        ARRANGEMENT,
        SECRETS["tokyo"],
        "tokyo",
        now=NOW,
        prekey_secret=tokyo_prekey,
    )
    assert approving.token.request == REQUEST_ID
    # A nil request is not the canonical form of "no request": malformed.
    with pytest.raises(ProtocolError):
        ReleaseToken.decode(resign_body(token(None), SECRETS["seoul"], Context.TOKEN, request=None))
    # Adding a request to a signed token breaks its signature.
    body = enc.unpack(enc.unpack(token(None))["body"])
    body["request"] = REQUEST_ID
    spliced = enc.pack({"body": enc.pack(body), "sig": enc.unpack(token(None))["sig"]})
    with pytest.raises(VerificationError):
        check_for_recipient(
            spliced, ARRANGEMENT, SECRETS["tokyo"], "tokyo", now=NOW, prekey_secret=tokyo_prekey
        )


def test_approval_rules() -> None:
    request = make_request()
    approval = ReleaseToken.decode(token(REQUEST_ID))
    check_approval(approval, "tokyo", request, answered=False)
    assert reason_of(check_approval, approval, "tokyo", None, answered=False) is Reason.UNSOLICITED
    assert reason_of(check_approval, approval, "tokyo", request, answered=True) is Reason.REPLAYED
    other_report = ReleaseToken.decode(token(REQUEST_ID, report=bytes(16)))
    assert reason_of(check_approval, other_report, "tokyo", request, answered=False) is (
        Reason.WRONG_REPORT
    )


# --- helpers ------------------------------------------------------------------------------


def _four_request() -> tuple[Arrangement, dict[str, MemberSecret], Request]:
    """:func:`_four`, and a request from Tokyo to Seoul under it."""
    arrangement, secrets = _four()
    request = Request.issue(
        secrets["tokyo"], "tokyo", arrangement, originator="seoul", report=REPORT,
        purpose="p", now=NOW, valid_for=60,
    )  # fmt: skip
    return arrangement, secrets, request


def _four() -> tuple[Arrangement, dict[str, MemberSecret]]:
    """The trio plus Canberra, a second originator and recipient."""
    secrets = dict(SECRETS)
    secrets["canberra"] = MemberSecret(sign_seed=bytes([9]) * 32, box_secret=bytes([10]) * 32)
    both = frozenset({Role.ORIGINATOR, Role.RECIPIENT})
    members = (
        *ARRANGEMENT.members,
        Member(name="canberra", identity=secrets["canberra"].public, roles=both),
    )
    arrangement = Arrangement(
        name=ARRANGEMENT.name,
        version=1,
        members=members,
        relay=ARRANGEMENT.relay,
        scopes=ARRANGEMENT.scopes,
        levels=ARRANGEMENT.levels,
        created=ARRANGEMENT.created,
    )
    return arrangement, secrets
