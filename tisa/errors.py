"""The toolkit's exceptions.

One base, :class:`TisaError`. Under it, :class:`LocalError` for mistakes the caller made
with the API (a wrong argument, a limit crossed locally) and :class:`RemoteError` for
what another party sent (malformed input, a refusal, a failed signature).

Two rules hold across the toolkit:

* Anything cryptographic that fails while opening or verifying input raises
  :class:`VerificationError` with one fixed message, whatever failed inside, so the error
  is no oracle for an attacker.
* A policy refusal (expired, out of scope, not a member, ...) raises :class:`Refused` with
  a machine-readable :class:`Reason`, which travels on the wire unchanged.
"""

from __future__ import annotations

import enum

__all__ = [
    "ArrangementNotEffective",
    "KeyFileError",
    "LimitExceeded",
    "LocalError",
    "ProtocolError",
    "Reason",
    "Refused",
    "RemoteError",
    "TisaError",
    "UsageError",
    "VerificationError",
]


class TisaError(Exception):
    """Base of every exception the toolkit raises on purpose."""


class LocalError(TisaError):
    """The caller did something the toolkit cannot do (bad argument, local limit)."""


class RemoteError(TisaError):
    """Input that came from another party is bad or was refused."""


class UsageError(LocalError):
    """An argument is of the wrong type or value."""


class KeyFileError(LocalError):
    """A key file cannot be read: wrong passphrase, damaged, or not a key file.

    The message does not say which, since a damaged file and a wrong passphrase look
    the same to the cryptography.
    """


class ProtocolError(RemoteError):
    """Input that does not decode: bad framing, bad msgpack, wrong schema, not canonical."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class LimitExceeded(ProtocolError):
    """Input that crosses a named limit (see :mod:`tisa.limits`)."""

    def __init__(self, limit: str, value: int, maximum: int) -> None:
        super().__init__(f"{limit} exceeded: {value} > {maximum}")
        self.limit = limit
        self.value = value
        self.maximum = maximum


class VerificationError(RemoteError):
    """A signature, MAC, sealed key or digest did not check out.

    Deliberately opaque: the message is always the same.
    """

    MESSAGE = "verification failed"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class Reason(enum.StrEnum):
    """Machine-readable reason codes for refusals, as sent on the wire."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    OUT_OF_SCOPE = "out_of_scope"
    LEVEL_NOT_ALLOWED = "level_not_allowed"
    NOT_A_MEMBER = "not_a_member"
    WRONG_ROLE = "wrong_role"
    WRONG_RECIPIENT = "wrong_recipient"
    WRONG_RELAY = "wrong_relay"
    WRONG_ORIGINATOR = "wrong_originator"
    WRONG_ARRANGEMENT = "wrong_arrangement"
    WRONG_REPORT = "wrong_report"
    REPLAYED = "replayed"
    REVOKED = "revoked"
    UNKNOWN_REPORT = "unknown_report"
    DUPLICATE = "duplicate"
    ARRANGEMENT_NOT_EFFECTIVE = "arrangement_not_effective"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    LIMIT = "limit"
    QUEUE_FULL = "queue_full"
    BUSY = "busy"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    # Consent (requests and answers). The first three are denial codes an originator
    # gives (with expired, out_of_scope, level_not_allowed; see tisa.consent).
    DENIED = "denied"
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"
    UNSOLICITED = "unsolicited"
    ANSWERED = "answered"
    REFLECTED = "reflected"
    WRONG_SENDER = "wrong_sender"
    NO_PREKEY = "no_prekey"
    BAD_PREKEY = "bad_prekey"
    UNKNOWN_PREKEY = "unknown_prekey"
    FALLBACK_NOT_ALLOWED = "fallback_not_allowed"


class Refused(RemoteError):
    """A party refused something by policy; ``reason`` says why."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class ArrangementNotEffective(Refused):
    """An arrangement lacks signatures; ``missing`` names who has not signed."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(Reason.ARRANGEMENT_NOT_EFFECTIVE, "not signed by " + ", ".join(missing))
        self.missing = missing
