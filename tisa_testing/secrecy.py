"""Forward secrecy, checked from a record: what a recorded token and ciphertext open,
given a recipient's long-term secret and whatever prekey secrets it (still) holds.

Used by ``tests/security/test_forward_secrecy.py`` and by the demo's forward-secrecy
step (:mod:`tisa_cli.demo`). The point of both: once the recipient has deleted the
prekey secret a token names, its long-term key plus every secret it kept open nothing
(:func:`open_record` raises :class:`~tisa.errors.VerificationError`), while the same
record with the deleted secret opens the report, so the failure is the deletion's doing
and not a gap in the record.

No trio and no network: :func:`held_prekey_secrets` reads a member's store file the way
anyone holding its disk would, read-only, through SQLite.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tisa.arrangement import Arrangement
from tisa.errors import Reason, Refused, TisaError, VerificationError
from tisa.keys import MemberSecret
from tisa.prekeys import PrekeyKind, PrekeySecret, unwrap_content_key
from tisa.report import OpenedReport, open_report
from tisa.token import ReleaseToken, check_for_recipient

__all__ = ["MEMBER_DB", "held_prekey_secrets", "open_record", "used_one_time_prekeys"]

# The database file of a member's store (clients.store.MemberStore), prekeys included.
MEMBER_DB = "member.db"


def _rows(store: Path, sql: str) -> list[Any]:
    path = store / MEMBER_DB
    if not path.is_file():
        raise OSError(f"no member store at {store}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OSError(f"cannot read {path}: {exc}") from None


def held_prekey_secrets(store: Path) -> list[PrekeySecret]:
    """Every prekey secret in the member store at ``store``, as its database file answers
    a separate, read-only reader (so only what the member has committed).

    Raises:
        OSError: there is no such store, or its database cannot be read.
    """
    rows = _rows(store, "SELECT kind, secret, created, not_after FROM prekeys")
    return [
        PrekeySecret(kind=PrekeyKind(k), secret=bytes(s), created=c, not_after=n)
        for k, s, c, n in rows
    ]


def used_one_time_prekeys(store: Path) -> set[bytes]:
    """The public keys of the one-time prekeys the member at ``store`` has used (their
    secrets deleted), read as :func:`held_prekey_secrets` reads.

    Raises:
        OSError: there is no such store, or its database cannot be read.
    """
    return {bytes(row[0]) for row in _rows(store, "SELECT public FROM used_prekeys")}


def open_record(
    token: bytes,
    ciphertexts: Sequence[bytes],
    arrangement: Arrangement,
    secret: MemberSecret,
    name: str,
    prekeys: Iterable[PrekeySecret],
    *,
    every_place: bool = True,
) -> OpenedReport:
    """Open a recorded report with recipient ``name``'s long-term ``secret`` and ``prekeys``.

    No bookkeeping stands in for cryptography: the prekey public keys the token names
    are not looked up; each held secret is tried in the token's prekey slots, and only
    the key wrap's authentication decides. With ``every_place`` each secret is tried in
    every slot (the signed and the one-time: ``n**2`` tries); without, only in the slot
    of its own kind (the kind of a prekey is public, so this loses no generality against
    a correct store, and costs ``signed * one_time`` tries).

    Args:
        token: the encoded release token, as the relay held or forwarded it.
        ciphertexts: recorded ciphertexts; the first that opens under the token counts.
        arrangement: the effective arrangement (the token's signature is checked).
        prekeys: the prekey secrets to try (none: the long-term key alone).

    Returns:
        The opened, verified report.

    Raises:
        VerificationError: no combination unwraps the content key, or no ciphertext
            opens under it (opaque, as everywhere).
        ProtocolError: the token is malformed.
        Refused: the token is not ``name``'s (``wrong_recipient``, before any key is
            tried), or, once a key unwraps, fails the rest of the recipient's check.
    """
    decoded = ReleaseToken.decode(token)
    if decoded.recipient != name:
        raise Refused(Reason.WRONG_RECIPIENT, f"token is for {decoded.recipient!r}")
    wrap = decoded.wrap
    held = list(prekeys)
    slots = [
        kind
        for kind, public in ((PrekeyKind.SIGNED, wrap.spk), (PrekeyKind.ONE_TIME, wrap.opk))
        if public is not None
    ]
    # A slot with nothing to try gets 32 zero bytes: the long-term key alone, tried all the same.
    candidates = [
        [p.secret for p in held if every_place or p.kind is kind] or [bytes(32)] for kind in slots
    ]
    for combination in itertools.product(*candidates):
        chosen = dict(zip(slots, combination, strict=True))

        def lookup(
            kind: PrekeyKind, public: bytes, chosen: dict[PrekeyKind, bytes] = chosen
        ) -> bytes:
            return chosen[kind]

        try:
            unwrap_content_key(wrap, decoded.associated_data, secret, lookup)
        except (VerificationError, Refused):
            continue
        release = check_for_recipient(
            token, arrangement, secret, name, now=decoded.not_before, prekey_secret=lookup
        )
        for ciphertext in ciphertexts:
            with contextlib.suppress(TisaError):
                return open_report(ciphertext, release.opener(arrangement))
    raise VerificationError()
