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
from tisa.envelope import open_envelope, seal_envelope
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
        """Sign a receipt as ``recipient``; returns it with ``encoded`` set."""
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
        encoded = seal_envelope(secret, Context.RECEIPT, body)
        fields.pop("v")
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify a receipt against the recipient's key in ``arrangement``.

        Raises:
            ProtocolError, VerificationError (also for a recipient the arrangement
            does not list), Refused (WRONG_ARRANGEMENT).
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
        fields.pop("v")
        return cls(**fields, encoded=bytes(data))


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
        """Sign as the arrangement's relay."""
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
        encoded = seal_envelope(secret, Context.ACK, body)
        fields.pop("v")
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify against the relay's key. Raises as :meth:`Receipt.verify`."""
        body, fields, signature = open_envelope(data, max_size=MAX_RECEIPT_SIZE, what="ack")
        fields = enc.check_map(fields, cls._SCHEMA, "ack")
        relay = arrangement.member(arrangement.relay)
        verify(relay.identity.signing, Context.ACK, body, signature)
        if fields["arrangement"] != arrangement.id:
            raise Refused(Reason.WRONG_ARRANGEMENT, "ack under another arrangement")
        fields.pop("v")
        return cls(**fields, encoded=bytes(data))
