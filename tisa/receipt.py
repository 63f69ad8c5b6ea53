"""Signed acknowledgements: the recipient's receipt and the relay's submission ack.

* :class:`Receipt` (context ``receipt``): the recipient states it opened and verified a
  report under a given token; the originator verifies it with the recipient's key.
* :class:`StoredAck` (context ``ack``): the relay states it has stored a report's
  ciphertext durably; the originator keeps it as evidence of hand-over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.envelope import open_envelope, seal_checked, seal_envelope
from tisa.errors import Reason, Refused, UsageError, VerificationError
from tisa.keys import DIGEST_SIZE, Context, MemberSecret, verify
from tisa.limits import MAX_NAME, MAX_REPORT_SIZE
from tisa.report import REPORT_ID_SIZE

__all__ = ["Receipt", "StoredAck"]

MAX_RECEIPT_SIZE = 1024
_name = enc.text(MAX_NAME)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """A recipient's signed statement that it opened and verified a report under a token.

    Make one with :meth:`issue` (signing) or :meth:`verify` (checking received bytes); both
    set ``encoded``.

    Attributes:
        report: the report id.
        token: the id of the release token the report came under.
        arrangement: the id of the arrangement it was checked against.
        originator, recipient: member names.
        digest: the ciphertext digest, as the token states it.
        received: unix time (seconds) at the recipient when it accepted the delivery.
        encoded: the signed envelope, as sent on the wire.
    """

    report: bytes
    token: bytes
    arrangement: bytes
    originator: str
    recipient: str
    digest: bytes
    received: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "v": enc.uint(1, 1),
        "report": enc.bin_exact(REPORT_ID_SIZE),
        "token": enc.bin_exact(16),
        "arrangement": enc.bin_exact(DIGEST_SIZE),
        "originator": _name,
        "recipient": _name,
        "digest": enc.bin_exact(DIGEST_SIZE),
        "received": enc.uint(),
    }

    @classmethod
    def issue(
        cls,
        secret: MemberSecret,
        arrangement: Arrangement,
        *,
        report: bytes,
        token: bytes,
        originator: str,
        recipient: str,
        digest: bytes,
        received: int,
    ) -> Self:
        """Sign a receipt as ``recipient``; returns it with ``encoded`` set.

        Raises:
            UsageError: ``secret`` is not ``recipient``'s key.
            ProtocolError, VerificationError, Refused: what :meth:`verify` would raise
                for the receipt (a field out of schema, a recipient that may not receive,
                an originator that may not originate).
        """
        if secret.public != arrangement.member(recipient).identity:
            raise UsageError(f"this key is not {recipient!r}'s key in the arrangement")
        body: dict[str, Any] = {
            "v": 1,
            "report": report,
            "token": token,
            "arrangement": arrangement.id,
            "originator": originator,
            "recipient": recipient,
            "digest": digest,
            "received": received,
        }
        # The fields are checked as verify checks them; the signature just made is not
        # verified again (tests check that issued bytes verify).
        fields = enc.check_map(dict(body), cls._SCHEMA, "receipt")
        try:
            arrangement.require_role(recipient, Role.RECIPIENT)
        except Refused:
            raise VerificationError() from None  # what verify would say of these bytes
        _check_originator(arrangement, originator, recipient)
        encoded = seal_envelope(secret, Context.RECEIPT, body)
        fields.pop("v")
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify a receipt against the recipient's key in ``arrangement``.

        Checks, in order (docs/protocol.md section 11.1): the schema; ``recipient`` is a
        member with the recipient role; the signature; ``arrangement``; ``originator``.

        Raises:
            ProtocolError: malformed.
            VerificationError: the signature does not verify, or the recipient is not a
                member that may receive (no key to check it with).
            Refused: WRONG_ARRANGEMENT; then for the signed ``originator``: NOT_A_MEMBER,
                WRONG_ROLE (may not originate), WRONG_RECIPIENT (the recipient itself).
        """
        body, fields, signature = open_envelope(data, max_size=MAX_RECEIPT_SIZE, what="receipt")
        fields = enc.check_map(fields, cls._SCHEMA, "receipt")
        try:
            member = arrangement.require_role(fields["recipient"], Role.RECIPIENT)
        except Refused:
            # No key to check the signature with; an unsigned name earns no reason code.
            raise VerificationError() from None
        verify(member.identity.signing, Context.RECEIPT, body, signature)
        if fields["arrangement"] != arrangement.id:
            raise Refused(Reason.WRONG_ARRANGEMENT, "receipt under another arrangement")
        _check_originator(arrangement, fields["originator"], fields["recipient"])
        fields.pop("v")
        return cls(**fields, encoded=bytes(data))


# The types of StoredAck.issue's arguments for which pack_checked gives pack's bytes.
_PLAIN_ACK = (bytes, str, bytes, int, int)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredAck:
    """The relay's signed statement that it stored a report's ciphertext durably.

    Make one with :meth:`issue` (signing) or :meth:`verify` (checking received bytes); both
    set ``encoded``.

    Attributes:
        report: the report id.
        arrangement: the arrangement id.
        originator: the member who submitted the report.
        digest, size: digest and length of the ciphertext the relay stored.
        stored: unix time (seconds) at the relay when it stored the report.
        encoded: the signed envelope, as sent in :class:`tisa.messages.Stored`.
    """

    report: bytes
    arrangement: bytes
    originator: str
    digest: bytes
    size: int
    stored: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "v": enc.uint(1, 1),
        "report": enc.bin_exact(REPORT_ID_SIZE),
        "arrangement": enc.bin_exact(DIGEST_SIZE),
        "originator": _name,
        "digest": enc.bin_exact(DIGEST_SIZE),
        "size": enc.uint(MAX_REPORT_SIZE, 1),
        "stored": enc.uint(),
    }

    @classmethod
    def issue(
        cls,
        secret: MemberSecret,
        arrangement: Arrangement,
        *,
        report: bytes,
        originator: str,
        digest: bytes,
        size: int,
        stored: int,
    ) -> Self:
        """Sign as the arrangement's relay.

        Raises:
            UsageError: ``secret`` is not the relay's key.
            ProtocolError, Refused: what :meth:`verify` would raise for the ack.
        """
        if secret.public != arrangement.member(arrangement.relay).identity:
            raise UsageError("this key is not the relay's key in the arrangement")
        body: dict[str, Any] = {
            "v": 1,
            "report": report,
            "arrangement": arrangement.id,
            "originator": originator,
            "digest": digest,
            "size": size,
            "stored": stored,
        }
        fields = enc.check_map(dict(body), cls._SCHEMA, "ack")
        _check_originator(arrangement, originator)
        if (type(report), type(originator), type(digest), type(size), type(stored)) == _PLAIN_ACK:
            # The relay signs one for every report, from plain values just checked
            # above: the canonical body without pack's walk (the same bytes, tested).
            encoded = seal_checked(secret, Context.ACK, enc.pack_checked(body))
        else:
            encoded = seal_envelope(secret, Context.ACK, body)
        fields.pop("v")
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify against the relay's key.

        Checks, in order (docs/protocol.md section 11.2): the schema; the relay's
        signature; ``arrangement``; ``originator``.

        Raises:
            ProtocolError: malformed. VerificationError: not the relay's signature.
            Refused: WRONG_ARRANGEMENT; then NOT_A_MEMBER or WRONG_ROLE for an
                ``originator`` that is not a member that may originate.
        """
        body, fields, signature = open_envelope(data, max_size=MAX_RECEIPT_SIZE, what="ack")
        fields = enc.check_map(fields, cls._SCHEMA, "ack")
        relay = arrangement.member(arrangement.relay)
        verify(relay.identity.signing, Context.ACK, body, signature)
        if fields["arrangement"] != arrangement.id:
            raise Refused(Reason.WRONG_ARRANGEMENT, "ack under another arrangement")
        _check_originator(arrangement, fields["originator"])
        fields.pop("v")
        return cls(**fields, encoded=bytes(data))


def _check_originator(
    arrangement: Arrangement, originator: str, recipient: str | None = None
) -> None:
    """The signed ``originator`` of a receipt or ack must be one that could have sent.

    Raises:
        Refused: NOT_A_MEMBER, WRONG_ROLE (may not originate), or WRONG_RECIPIENT (a
            receipt whose originator is its own recipient: nobody sends to itself).
    """
    arrangement.require_role(originator, Role.ORIGINATOR)
    if originator == recipient:
        raise Refused(Reason.WRONG_RECIPIENT, "an originator does not send to itself")
