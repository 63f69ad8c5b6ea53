#!/usr/bin/env python3
"""Generate the test vectors in ``tests/vectors/*.json`` from fixed inputs.

Usage::

    python scripts/make_vectors.py            # (re)write the files
    python scripts/make_vectors.py --check    # exit 1 if the files are out of date
    python scripts/make_vectors.py --fresh    # new libsodium randomness for every vector

Everything is derived from fixed seeds and a fixed clock, through the toolkit's private
entry points for randomness (``_report_id``, ``_content_key``, ``token_id``,
``_ephemeral`` for a token's key wrap; prekey secrets are derived here). One thing
cannot be fixed that way, because libsodium draws it itself: the secretstream header at
the start of a report's ciphertext. Vectors that contain it say so in ``generated``;
the bytes are kept as produced and checked by opening them. When the
files already exist, the script reuses those bytes wherever they still open to exactly
what the current code would produce, so running it again changes nothing unless the
protocol did. ``tests/test_vectors.py`` checks that, and every verdict.

Conventions in the files: byte strings are lowercase hex; times are unix seconds; an
expected failure names the exception class and, for a refusal, the reason code. The
format of every file is documented in docs/protocol.md, Appendix C.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.exceptions

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role, SignedArrangement
from tisa.audit import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    Checkpoint,
    chain_next,
    verify_extract,
)
from tisa.consent import Announcement, Answer, Request
from tisa.errors import (
    ArrangementNotEffective,
    ProtocolError,
    Reason,
    Refused,
    TisaError,
    VerificationError,
)
from tisa.keys import Context, Hash, MemberSecret, digest
from tisa.limits import CHUNK_SIZE, CLOCK_SKEW, MAX_INLINE_CIPHERTEXT, MAX_INLINE_TOKENS
from tisa.messages import MAX_PREKEY_BUNDLES, MAX_RECEIPT_ACKS, decode_message
from tisa.prekeys import Prekey, PrekeyKind, PrekeySecret
from tisa.receipt import Receipt, StoredAck
from tisa.report import ReportOpener, ReportSealer, key_commitment, open_report, padded_size
from tisa.token import check_for_recipient, check_for_relay, issue_token

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "vectors"
FILES = (
    "arrangement.json",
    "report.json",
    "token.json",
    "receipt.json",
    "encoding.json",
    "audit.json",
    "consent.json",
    "prekey.json",
    "message.json",
)

# 1 January 2015, three days after the arrangement was signed.
NOW = 1_420_070_400
CREATED = 1_419_811_200
NOT_BEFORE, NOT_AFTER = NOW - 600, NOW + 86_400
# Ed25519 group order, for the malleated-signature vectors.
ED25519_L = 2**252 + 27742317777372353535851937790883648493
# The body of report-short-body, and of the reports derived from its plaintext.
SHORT_BODY = b"Launch detected 04:12 KST, 38.9N 125.1E; assessed short-range."
# Store a ciphertext in full below this size; above it, as a mutation of its base.
INLINE_LIMIT = 16 * 1024

SS_HEADER = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
SS_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

ROLES = {
    "canberra": (Role.RECIPIENT,),
    "seoul": (Role.ORIGINATOR, Role.RECIPIENT),
    "tokyo": (Role.ORIGINATOR, Role.RECIPIENT),
    "washington": (Role.RELAY,),
}
SCOPES = ("missile", "nuclear")
LEVELS = ("restricted", "confidential", "secret")


def derive(label: str, size: int = 32) -> bytes:
    """Fixed pseudo-random bytes for ``label``: every input of the vectors comes from here."""
    return hashlib.sha256(b"tisa-vectors/" + label.encode()).digest()[:size]


def hexed(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: hexed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [hexed(v) for v in value]
    return value


def body_pattern(length: int) -> bytes:
    """The body of the large vectors: byte i is i mod 251 (prime, so no chunk repeats)."""
    return bytes(i % 251 for i in range(length))


# --- raw secretstream, for ciphertexts the sealer would never produce ---------------------


def decrypt(ciphertext: bytes, key: bytes, report_id: bytes) -> tuple[bytes, list[int]] | None:
    """Decrypt chunk by chunk as the format prescribes; None if any chunk fails."""
    if len(ciphertext) < SS_HEADER:
        return None
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, ciphertext[:SS_HEADER], key)
        plain, tags = [], []
        for start in range(SS_HEADER, len(ciphertext), CHUNK_SIZE + SS_ABYTES):
            chunk = ciphertext[start : start + CHUNK_SIZE + SS_ABYTES]
            piece, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, report_id)
            plain.append(bytes(piece))
            tags.append(tag)
    except (nacl.exceptions.CryptoError, ValueError):
        return None
    return b"".join(plain), tags


def encrypt(plaintext: bytes, key: bytes, report_id: bytes, *, final: bool = True) -> bytes:
    """Encrypt like the sealer (chunks, report id as AD); ``final=False`` omits the FINAL tag."""
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    out = [bytes(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key))]
    starts = range(0, len(plaintext), CHUNK_SIZE)
    for start in starts:
        last = start == starts[-1]
        tag = TAG_FINAL if last and final else TAG_MESSAGE
        piece = plaintext[start : start + CHUNK_SIZE]
        out.append(
            bytes(sodium.crypto_secretstream_xchacha20poly1305_push(state, piece, report_id, tag))
        )
    return b"".join(out)


def mutate(data: bytes, mutation: Mapping[str, Any]) -> bytes:
    """Apply one of the mutations the vectors use (see ``tests/test_vectors.py``)."""
    kind, arg = next(iter(mutation.items()))
    if kind == "flip":
        changed = bytearray(data)
        changed[arg["offset"]] ^= arg["mask"]
        return bytes(changed)
    if kind == "truncate":
        return data[:arg]
    if kind == "append":
        return data + bytes.fromhex(arg)
    if kind == "drop":
        return data[: arg[0]] + data[arg[1] :]
    raise ValueError(f"unknown mutation {kind!r}")


# --- signers that misbehave --------------------------------------------------------------


class ContextSwap(MemberSecret):
    """A member's keys, signing under a fixed context whatever it is asked for."""

    __slots__ = ("_use",)

    def __init__(self, *, sign_seed: bytes, box_secret: bytes, use: Context) -> None:
        super().__init__(sign_seed=sign_seed, box_secret=box_secret)
        self._use = use

    def sign(self, context: Context, message: bytes) -> bytes:
        return super().sign(self._use, message)


class KeySwap(MemberSecret):
    """Claims one member's public identity, signs with another member's key."""

    __slots__ = ("_signer",)

    def __init__(self, *, sign_seed: bytes, box_secret: bytes, signer: MemberSecret) -> None:
        super().__init__(sign_seed=sign_seed, box_secret=box_secret)
        self._signer = signer

    def sign(self, context: Context, message: bytes) -> bytes:
        return self._signer.sign(context, message)


# --- the world ---------------------------------------------------------------------------


def seeds(name: str) -> dict[str, bytes]:
    return {"sign_seed": derive(f"sign-seed/{name}"), "box_secret": derive(f"box-secret/{name}")}


SECRETS = {name: MemberSecret(**seeds(name)) for name in ROLES}


def make_arrangement() -> Arrangement:
    return Arrangement(
        name="tisa-2014",
        version=1,
        members=tuple(
            Member(name=name, identity=SECRETS[name].public, roles=frozenset(roles))
            for name, roles in ROLES.items()
        ),
        relay="washington",
        scopes=SCOPES,
        levels=LEVELS,
        created=CREATED,
    )


V1 = make_arrangement()
# The amendment adds a level; same members and keys, so old signatures still verify and
# only the arrangement id and version tell the two apart.
V2 = V1.amend(levels=(*LEVELS, "top-secret"))
ARRANGEMENTS = {"v1": V1, "v2": V2}

# Tokyo's prekeys, published a day before the tokens and valid for a week.
PREKEY_CREATED, PREKEY_NOT_AFTER = NOW - 86_400, NOW + 6 * 86_400


def make_prekey(label: str, kind: PrekeyKind) -> PrekeySecret:
    return PrekeySecret(
        kind=kind,
        secret=derive(f"prekey/{label}"),
        created=PREKEY_CREATED,
        not_after=PREKEY_NOT_AFTER,
    )


TOKYO_PREKEYS = {
    "signed": make_prekey("tokyo/signed", PrekeyKind.SIGNED),
    "one-time-1": make_prekey("tokyo/one-time/1", PrekeyKind.ONE_TIME),
}
PREKEY_ENCODED = {
    label: secret.publish(SECRETS["tokyo"], "tokyo", V1) for label, secret in TOKYO_PREKEYS.items()
}


def expect_ok(**values: Any) -> dict[str, Any]:
    return {"result": "ok", **hexed(values)}


def expect_error(error: type[TisaError], reason: str | None = None) -> dict[str, Any]:
    return {"result": "error", "error": error.__name__, "reason": reason}


def outcome(call: Callable[[], Any]) -> tuple[str, str | None]:
    """What ``call`` does, as (class name or "ok", reason code)."""
    try:
        call()
    except Refused as exc:
        return type(exc).__name__, exc.reason.value
    except TisaError as exc:
        return type(exc).__name__, None
    return "ok", None


class Builder:
    """Builds every file; reuses libsodium's random bytes from ``previous`` when it can."""

    def __init__(self, previous: Mapping[str, Any], fresh: bool) -> None:
        self._previous: dict[str, dict[str, Any]] = {}
        if not fresh:
            for document in previous.values():
                for vector in document.get("vectors", []):
                    self._previous[vector["id"]] = vector
        self.reports: dict[str, dict[str, Any]] = {}

    def previous(self, vector_id: str) -> dict[str, Any] | None:
        return self._previous.get(vector_id)

    # --- arrangement -------------------------------------------------------------------

    def arrangement_file(self) -> dict[str, Any]:
        members = {
            name: {
                **hexed(seeds(name)),
                "roles": sorted(r.value for r in roles),
                "sign_public": SECRETS[name].public.signing.raw.hex(),
                "box_public": SECRETS[name].public.encryption.raw.hex(),
                "fingerprint": SECRETS[name].public.fingerprint,
            }
            for name, roles in ROLES.items()
        }
        versions = {}
        for label, arrangement in ARRANGEMENTS.items():
            signed = SignedArrangement(arrangement)
            for name in ROLES:
                signed = signed.signed_by(SECRETS[name], name)
            versions[label] = {
                "encoded": arrangement.encoded.hex(),
                "id": arrangement.id.hex(),
                "version": arrangement.version,
                "signatures": hexed(dict(signed.signatures)),
                "signed": signed.encode().hex(),
            }
        v1_signatures = {n: V1.sign(SECRETS[n], n) for n in ROLES}
        invalid = [
            (
                "arrangement-missing-signature",
                "Tokyo has not signed: not effective, and the error names Tokyo.",
                {k: v for k, v in v1_signatures.items() if k != "tokyo"},
                expect_error(ArrangementNotEffective, "arrangement_not_effective")
                | {"missing": ["tokyo"]},
            ),
            (
                "arrangement-wrong-context",
                "Seoul's signature is over the id but in context token.",
                {**v1_signatures, "seoul": SECRETS["seoul"].sign(Context.TOKEN, V1.id)},
                expect_error(VerificationError),
            ),
            (
                "arrangement-signature-of-other-version",
                "Seoul's signature is for version 2.",
                {**v1_signatures, "seoul": V2.sign(SECRETS["seoul"], "seoul")},
                expect_error(VerificationError),
            ),
            (
                "arrangement-malleated-signature",
                "Seoul's signature with S replaced by S + L.",
                {**v1_signatures, "seoul": malleate(v1_signatures["seoul"])},
                expect_error(VerificationError),
            ),
            (
                "arrangement-signature-by-non-member",
                "A signature under a name the arrangement does not list.",
                {
                    **v1_signatures,
                    "beijing": MemberSecret(**seeds("beijing")).sign(Context.ARRANGEMENT, V1.id),
                },
                expect_error(Refused, "not_a_member"),
            ),
        ]
        invalid.extend(self._arrangement_check_order(v1_signatures))
        vectors: list[dict[str, Any]] = [
            {
                "id": "arrangement-v1",
                "description": "Version 1, signed by every member: effective.",
                "signed": versions["v1"]["signed"],
                "expect": expect_ok(id=V1.id),
            },
            {
                "id": "arrangement-v2",
                "description": "The amendment, signed by every member again: effective.",
                "signed": versions["v2"]["signed"],
                "expect": expect_ok(id=V2.id),
            },
        ]
        for vector_id, description, signatures, expected in invalid:
            signed_bytes = enc.pack({"arrangement": V1.encoded, "signatures": signatures})
            vectors.append(
                {
                    "id": vector_id,
                    "description": description,
                    "signed": signed_bytes.hex(),
                    "expect": expected,
                }
            )
        vectors.extend(self._arrangement_validity())
        noncanonical = msgpack.packb(
            {"signatures": v1_signatures, "arrangement": V1.encoded}, use_bin_type=True
        )
        vectors.append(
            {
                "id": "arrangement-noncanonical-map-order",
                "description": "The signed arrangement with its keys out of order.",
                "signed": noncanonical.hex(),
                "expect": expect_error(ProtocolError),
            }
        )
        for vector in vectors:
            self._check_arrangement(vector)
        return {
            "description": "Members (with the seeds every other file derives from), the "
            "arrangement in two versions, and signed arrangements to load with "
            "SignedArrangement.load_effective.",
            "members": members,
            "arrangements": versions,
            "vectors": vectors,
        }

    def _arrangement_check_order(
        self, good: Mapping[str, bytes]
    ) -> list[tuple[str, str, dict[str, bytes], dict[str, Any]]]:
        """Several faults at once: the verdict follows the order of section 8.2, not the
        order in which the names sort (canberra sorts first, zurich last)."""
        bad_canberra = SECRETS["canberra"].sign(Context.TOKEN, V1.id)
        zurich = MemberSecret(**seeds("zurich")).sign(Context.ARRANGEMENT, V1.id)
        no_tokyo = {k: v for k, v in good.items() if k != "tokyo"}
        return [
            (
                "arrangement-order-non-member-before-bad-signature",
                "Canberra's signature is bad and Zurich, not a member, signed too: every "
                "name is checked before any signature, so not_a_member.",
                {**good, "canberra": bad_canberra, "zurich": zurich},
                expect_error(Refused, "not_a_member"),
            ),
            (
                "arrangement-order-non-member-before-missing",
                "Tokyo has not signed and Zurich, not a member, has: not_a_member.",
                {**no_tokyo, "zurich": zurich},
                expect_error(Refused, "not_a_member"),
            ),
            (
                "arrangement-order-bad-signature-before-missing",
                "Tokyo has not signed and Canberra's signature is bad: the signature fails.",
                {**no_tokyo, "canberra": bad_canberra},
                expect_error(VerificationError),
            ),
            (
                "arrangement-no-signatures",
                "Nobody has signed: not effective, and the error names every member in "
                "member order.",
                {},
                expect_error(ArrangementNotEffective, "arrangement_not_effective")
                | {"missing": sorted(ROLES, key=str.encode)},
            ),
        ]

    def _arrangement_validity(self) -> list[dict[str, Any]]:
        """Arrangements that break a rule of section 8.1, each signed by all its members
        over its own id: malformed, whatever the signatures; and names the text rule
        allows, however odd (section 3.3)."""
        base = V1.to_dict()

        def member(name: str, **changes: Any) -> dict[str, Any]:
            entry = next(m for m in base["members"] if m["name"] == name)
            return {**entry, **changes}

        def members(**changed: dict[str, Any]) -> list[dict[str, Any]]:
            return [changed.get(m["name"], m) for m in base["members"]]

        seoul_identity = base["members"][1]["identity"]
        malformed = expect_error(ProtocolError)
        specs: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
            (
                "arrangement-invalid-relay-also-recipient",
                "The relay also holds the recipient role.",
                {"members": members(washington=member("washington", roles=["recipient", "relay"]))},
                malformed,
            ),
            (
                "arrangement-invalid-relay-without-role",
                "relay names Seoul, who does not hold the relay role.",
                {"relay": "seoul"},
                malformed,
            ),
            (
                "arrangement-invalid-shared-key",
                "Tokyo lists Seoul's keys.",
                {"members": members(tokyo=member("tokyo", identity=seoul_identity))},
                malformed,
            ),
            (
                "arrangement-invalid-low-order-box-key",
                "Tokyo's X25519 key is the all-zero (low-order) point.",
                {
                    "members": members(
                        tokyo=member(
                            "tokyo",
                            identity={**member("tokyo")["identity"], "box": bytes(32)},
                        )
                    )
                },
                malformed,
            ),
            (
                "arrangement-invalid-previous-on-version-1",
                "Version 1 naming a previous version.",
                {"previous": bytes(32)},
                malformed,
            ),
            (
                "arrangement-invalid-members-out-of-order",
                "Members not sorted by name.",
                {"members": list(reversed(base["members"]))},
                malformed,
            ),
            (
                "arrangement-invalid-scopes-out-of-order",
                "Scopes not sorted.",
                {"scopes": list(reversed(base["scopes"]))},
                malformed,
            ),
            (
                "arrangement-invalid-duplicate-level",
                "A level listed twice.",
                {"levels": [*base["levels"], base["levels"][0]]},
                malformed,
            ),
            (
                "arrangement-invalid-control-character-in-name",
                "The arrangement's name holds U+001F (a C0 control character).",
                {"name": "tisa\x1f2014"},
                malformed,
            ),
            (
                "arrangement-invalid-delete-in-scope",
                "A scope holds U+007F (DEL).",
                {"scopes": ["missile", "nuclear\x7f"]},
                malformed,
            ),
            (
                "arrangement-name-with-unicode-line-breaks",
                "The arrangement's name holds U+0085 (NEL, a C1 control) and U+2028 (LINE "
                "SEPARATOR): allowed, names exclude only U+0000..U+001F and U+007F.",
                {"name": "tisa\u0085\u20282014"},
                {},
            ),
        ]
        out: list[dict[str, Any]] = []
        for vector_id, description, changes, expected in specs:
            encoded = enc.pack({**base, **changes})
            arrangement_id = digest(Hash.ARRANGEMENT, encoded)
            signatures = {n: SECRETS[n].sign(Context.ARRANGEMENT, arrangement_id) for n in ROLES}
            out.append(
                {
                    "id": vector_id,
                    "description": description,
                    "signed": enc.pack({"arrangement": encoded, "signatures": signatures}).hex(),
                    "expect": expected or expect_ok(id=arrangement_id),
                }
            )
        return out

    def _check_arrangement(self, vector: dict[str, Any]) -> None:
        data = bytes.fromhex(vector["signed"])
        verdict = outcome(lambda: SignedArrangement.load_effective(data))
        _require(vector, verdict)

    # --- reports -----------------------------------------------------------------------

    def seal(
        self,
        vector_id: str,
        *,
        body: bytes,
        attachments: Sequence[tuple[str, bytes]] = (),
        recipients: Sequence[str] = ("tokyo",),
        scope: str = "missile",
        level: str = "secret",
        secret: MemberSecret | None = None,
    ) -> dict[str, Any]:
        """Seal with fixed id and key; keep the previous ciphertext if it opens the same."""
        report_id = derive(f"report-id/{vector_id}", 16)
        content_key = derive(f"content-key/{vector_id}")
        sealer = ReportSealer(
            secret or SECRETS["seoul"],
            "seoul",
            V1,
            recipients=recipients,
            scope=scope,
            level=level,
            body_size=len(body),
            attachments=[(n, len(d)) for n, d in attachments],
            now=CREATED + 86_400,
            _report_id=report_id,
            _content_key=content_key,
        )
        parts = [sealer.start(), sealer.write(body)]
        parts.extend(sealer.write(data) for _, data in attachments)
        parts.extend(sealer.finish_iter())
        ciphertext = b"".join(parts)
        opened = decrypt(ciphertext, content_key, report_id)
        assert opened is not None
        plaintext = opened[0]
        ciphertext = self._reuse(vector_id, ciphertext, content_key, report_id, plaintext, True)
        header = enc.pack(sealer.header.to_dict())
        return {
            "report_id": report_id,
            "content_key": content_key,
            "ciphertext": ciphertext,
            "plaintext": plaintext,
            "header": header,
            "padded_size": sealer.padded,
            "recipients": sealer.header.recipients,
            "scope": scope,
            "level": level,
        }

    def _reuse(
        self,
        vector_id: str,
        fresh: bytes,
        key: bytes,
        report_id: bytes,
        plaintext: bytes,
        final: bool,
    ) -> bytes:
        previous = self.previous(vector_id)
        if previous is None or "ciphertext" not in previous:
            return fresh
        old = bytes.fromhex(previous["ciphertext"])
        opened = decrypt(old, key, report_id)
        if opened is None or opened[0] != plaintext or len(old) != len(fresh):
            return fresh
        tags = opened[1]
        if (tags[-1] == TAG_FINAL) != final or TAG_FINAL in tags[:-1]:
            return fresh
        return old

    def report_file(self) -> dict[str, Any]:
        valid_specs: list[tuple[str, str, dict[str, Any]]] = [
            ("report-empty-body", "No body, no attachments: the smallest bucket.", {"body": b""}),
            (
                "report-short-body",
                "A short body in the smallest bucket.",
                {"body": SHORT_BODY},
            ),
            (
                "report-with-attachments",
                "A body and two attachments, one of them empty.",
                {
                    "body": b"See attached track.",
                    "attachments": [("track.csv", b"t,lat,lon\n0,38.9,125.1\n"), ("empty", b"")],
                },
            ),
            (
                "report-two-recipients",
                "One report for Tokyo and Canberra (recipients are sorted in the header).",
                {"body": b"for both", "recipients": ("tokyo", "canberra"), "scope": "nuclear"},
            ),
            (
                "report-two-chunks",
                "A body of 70000 bytes (byte i is i mod 251): two chunks, the second FINAL.",
                {"body": body_pattern(70_000), "level": "restricted"},
            ),
        ]
        vectors: list[dict[str, Any]] = []
        for vector_id, description, spec in valid_specs:
            sealed = self.seal(vector_id, **spec)
            self.reports[vector_id] = sealed
            vector: dict[str, Any] = {
                "id": vector_id,
                "description": description,
                "generated": "the ciphertext starts with a secretstream header libsodium "
                "draws at random; everything after follows from it, the key and the "
                "plaintext. Checked by opening.",
                "inputs": self._report_inputs(vector_id, spec, sealed),
                "open": self._open_params(sealed, "tokyo"),
                "expect": expect_ok(
                    header=sealed["header"],
                    signature=self._inner_signature(sealed),
                    padded_size=sealed["padded_size"],
                    ciphertext_size=len(sealed["ciphertext"]),
                    plaintext_sha256=hashlib.sha256(sealed["plaintext"]).digest(),
                ),
            }
            if len(sealed["plaintext"]) <= INLINE_LIMIT:
                vector["expect"]["plaintext"] = sealed["plaintext"].hex()
            vector["ciphertext"] = sealed["ciphertext"].hex()
            vectors.append(vector)
        vectors.extend(self._invalid_reports())
        for vector in vectors:
            self._check_report(vector)
        return {
            "description": "Sealed reports. Open each with a ReportOpener built from "
            "'open' (arrangement by label, see arrangement.json) and compare with "
            "'expect'. 'ciphertext' is given in full, or as a mutation of another "
            "vector's ciphertext ('base' and 'mutation').",
            "chunk_size": CHUNK_SIZE,
            "vectors": vectors,
        }

    def _report_inputs(
        self, vector_id: str, spec: Mapping[str, Any], sealed: Mapping[str, Any]
    ) -> dict[str, Any]:
        body: bytes = spec["body"]
        inputs: dict[str, Any] = {
            "originator": "seoul",
            "arrangement": "v1",
            "recipients": list(spec.get("recipients", ("tokyo",))),
            "scope": sealed["scope"],
            "level": sealed["level"],
            "created": CREATED + 86_400,
            "report_id": sealed["report_id"].hex(),
            "content_key": sealed["content_key"].hex(),
            "attachments": [{"name": n, "data": d.hex()} for n, d in spec.get("attachments", ())],
        }
        if body == body_pattern(len(body)) and len(body) > INLINE_LIMIT:
            inputs["body_pattern"] = {"length": len(body), "byte_i": "i mod 251"}
        else:
            inputs["body"] = body.hex()
        return inputs

    def _inner_signature(self, sealed: Mapping[str, Any]) -> bytes:
        signature = SECRETS["seoul"].sign(Context.REPORT, sealed["header"])
        header = sealed["header"]
        if sealed["plaintext"][4 + len(header) : 4 + len(header) + 64] != signature:
            raise SystemExit(
                "the report plaintext layout changed: update make_vectors.py (and the "
                "layout in tests/test_vectors.py) to match tisa/report.py"
            )
        return signature

    def _open_params(
        self, sealed: Mapping[str, Any], recipient: str, **changes: Any
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "as": recipient,
            "arrangement": "v1",
            "content_key": sealed["content_key"],
            "report_id": sealed["report_id"],
            "digest": digest(Hash.CIPHERTEXT, sealed["ciphertext"]),
            "size": len(sealed["ciphertext"]),
            "originator": "seoul",
            "scope": sealed["scope"],
            "level": sealed["level"],
        }
        params.update(changes)
        hexed_params: dict[str, Any] = hexed(params)
        return hexed_params

    def _invalid_reports(self) -> list[dict[str, Any]]:
        short = self.reports["report-short-body"]
        short_ct: bytes = short["ciphertext"]
        wire_chunk = CHUNK_SIZE + SS_ABYTES
        out: list[dict[str, Any]] = []

        def derived(
            vector_id: str,
            description: str,
            base: str,
            mutation: dict[str, Any] | None,
            expected: dict[str, Any],
            *,
            as_: str = "tokyo",
            follow: bool = False,
            **changes: Any,
        ) -> None:
            """A vector from ``base``'s ciphertext; ``follow``: the token states the
            mutated ciphertext's digest and size (the attacker controls them too)."""
            sealed = self.reports[base]
            ciphertext = sealed["ciphertext"]
            if mutation is not None:
                ciphertext = mutate(ciphertext, mutation)
            if follow:
                changes.setdefault("digest", digest(Hash.CIPHERTEXT, ciphertext))
                changes.setdefault("size", len(ciphertext))
            vector: dict[str, Any] = {
                "id": vector_id,
                "description": description,
                "base": base,
                "open": self._open_params(sealed, as_, **changes),
                "expect": expected,
            }
            if mutation is not None:
                vector["mutation"] = mutation
            if len(ciphertext) <= INLINE_LIMIT:
                vector["ciphertext"] = ciphertext.hex()
            out.append(vector)

        opaque = expect_error(VerificationError)
        short_last_chunk_tag = len(short_ct) - 1
        derived(
            "report-flipped-stream-header",
            "First byte of the secretstream header flipped.",
            "report-short-body",
            {"flip": {"offset": 0, "mask": 1}},
            opaque,
        )
        derived(
            "report-flipped-first-ciphertext-byte",
            "First byte after the secretstream header flipped (the chunk's tag byte).",
            "report-short-body",
            {"flip": {"offset": SS_HEADER, "mask": 0x80}},
            opaque,
        )
        derived(
            "report-flipped-chunk-tag",
            "Last byte of the chunk's Poly1305 tag flipped.",
            "report-short-body",
            {"flip": {"offset": short_last_chunk_tag, "mask": 1}},
            opaque,
        )
        derived(
            "report-flipped-chunk-tag-digest-follows",
            "As report-flipped-chunk-tag, with digest and size stated for the altered bytes.",
            "report-short-body",
            {"flip": {"offset": short_last_chunk_tag, "mask": 1}},
            opaque,
            follow=True,
        )
        derived(
            "report-flipped-middle-byte",
            "A byte in the middle of the encrypted plaintext flipped.",
            "report-short-body",
            {"flip": {"offset": len(short_ct) // 2, "mask": 4}},
            opaque,
            follow=True,
        )
        derived(
            "report-truncated",
            "Last byte cut off; digest and size as the token states them for the whole.",
            "report-short-body",
            {"truncate": len(short_ct) - 1},
            opaque,
        )
        derived(
            "report-truncated-digest-follows",
            "Last byte cut off; digest and size stated for what is left.",
            "report-short-body",
            {"truncate": len(short_ct) - 1},
            opaque,
            follow=True,
        )
        derived(
            "report-extended",
            "One zero byte appended.",
            "report-short-body",
            {"append": "00"},
            opaque,
        )
        derived(
            "report-extended-digest-follows",
            "A whole extra tag's worth of bytes appended, digest and size following.",
            "report-short-body",
            {"append": "00" * SS_ABYTES},
            opaque,
            follow=True,
        )
        derived(
            "report-dropped-final-chunk",
            "The two-chunk report without its FINAL chunk: authentic so far, but unfinished.",
            "report-two-chunks",
            {"truncate": SS_HEADER + wire_chunk},
            opaque,
            follow=True,
        )
        derived(
            "report-dropped-first-chunk",
            "The two-chunk report without its first chunk.",
            "report-two-chunks",
            {"drop": [SS_HEADER, SS_HEADER + wire_chunk]},
            opaque,
            follow=True,
        )
        derived(
            "report-flipped-chunk-tag-first-of-two",
            "The first chunk's tag altered in the two-chunk report.",
            "report-two-chunks",
            {"flip": {"offset": SS_HEADER + wire_chunk - 1, "mask": 0x10}},
            opaque,
            follow=True,
        )
        derived(
            "report-wrong-key",
            "Opened with a content key one bit off.",
            "report-short-body",
            None,
            opaque,
            content_key=_flip(short["content_key"], 31),
        )
        derived(
            "report-wrong-report-id",
            "Opened with another report id (the chunks' additional data).",
            "report-short-body",
            None,
            opaque,
            report_id=_flip(short["report_id"], 0),
        )
        derived(
            "report-wrong-digest",
            "The token states another digest.",
            "report-short-body",
            None,
            opaque,
            digest=bytes(32),
        )
        derived(
            "report-wrong-size",
            "The token states a size one chunk tag larger.",
            "report-short-body",
            None,
            opaque,
            size=len(short_ct) + SS_ABYTES,
        )
        derived(
            "report-wrong-originator",
            "The token names Tokyo as the originator of Seoul's report.",
            "report-short-body",
            None,
            opaque,
            originator="tokyo",
        )
        derived(
            "report-wrong-scope",
            "The token states another scope than the signed header.",
            "report-short-body",
            None,
            opaque,
            scope="nuclear",
        )
        derived(
            "report-wrong-level",
            "The token states another level than the signed header.",
            "report-short-body",
            None,
            opaque,
            level="confidential",
        )
        derived(
            "report-wrong-recipient",
            "Canberra holds the key but the signed recipient list names Tokyo only.",
            "report-short-body",
            None,
            expect_error(Refused, "wrong_recipient"),
            as_="canberra",
        )
        derived(
            "report-wrong-arrangement",
            "Opened under version 2: signed and intact, but sealed under version 1.",
            "report-short-body",
            None,
            expect_error(Refused, "wrong_arrangement"),
            arrangement="v2",
        )
        out.extend(self._resealed_reports())
        out.extend(self._signed_share_reports())
        return out

    def _signed_share_reports(self) -> list[dict[str, Any]]:
        """Headers Seoul signed that the sealer would refuse to make: intact and signed,
        so the opener refuses them by policy, with a reason (section 9.4, step 7)."""
        short = self.reports["report-short-body"]
        header = enc.unpack(short["header"])
        specs: list[tuple[str, str, dict[str, Any], str]] = [
            (
                "report-header-version-mismatch",
                "The header names version 1's id with version 2.",
                {"version": 2},
                "wrong_arrangement",
            ),
            (
                "report-recipient-is-relay",
                "The signed recipients list Washington, the relay, beside Tokyo.",
                {"recipients": ["tokyo", "washington"]},
                "wrong_role",
            ),
            (
                "report-recipient-not-a-member",
                "The signed recipients list Beijing, not a member, beside Tokyo.",
                {"recipients": ["beijing", "tokyo"]},
                "not_a_member",
            ),
            (
                "report-recipient-is-originator",
                "The signed recipients list Seoul, the originator, beside Tokyo.",
                {"recipients": ["seoul", "tokyo"]},
                "wrong_recipient",
            ),
            (
                "report-out-of-scope",
                "Header and token agree on scope chemical, which the arrangement lacks.",
                {"scope": "chemical"},
                "out_of_scope",
            ),
        ]
        out: list[dict[str, Any]] = []
        for vector_id, description, changes, reason in specs:
            header_bytes = enc.pack({**header, **changes})
            content = (
                len(header_bytes).to_bytes(4, "big")
                + header_bytes
                + SECRETS["seoul"].sign(Context.REPORT, header_bytes)
                + SHORT_BODY
            )
            plaintext = content + bytes(padded_size(len(content)) - len(content))
            key, report_id = short["content_key"], short["report_id"]
            fresh = encrypt(plaintext, key, report_id)
            ciphertext = self._reuse(vector_id, fresh, key, report_id, plaintext, True)
            sealed = {**short, "ciphertext": ciphertext, "scope": changes.get("scope", "missile")}
            out.append(
                {
                    "id": vector_id,
                    "description": description,
                    "generated": "random secretstream header; checked by decrypting",
                    "open": self._open_params(sealed, "tokyo"),
                    "ciphertext": ciphertext.hex(),
                    "expect": expect_error(Refused, reason),
                }
            )
        return out

    def _resealed_reports(self) -> list[dict[str, Any]]:
        """Reports whose plaintext the honest sealer would never produce."""
        out: list[dict[str, Any]] = []
        body = SHORT_BODY
        seoul = seeds("seoul")
        for vector_id, description, secret in [
            (
                "report-wrong-context",
                "The header signed by Seoul in context token instead of report.",
                ContextSwap(**seoul, use=Context.TOKEN),
            ),
            (
                "report-signed-by-other-member",
                "A header naming Seoul as originator, signed with Tokyo's key.",
                KeySwap(**seoul, signer=SECRETS["tokyo"]),
            ),
        ]:
            sealed = self.seal(vector_id, body=body, secret=secret)
            out.append(
                {
                    "id": vector_id,
                    "description": description,
                    "generated": "random secretstream header; checked by decrypting",
                    "open": self._open_params(sealed, "tokyo"),
                    "ciphertext": sealed["ciphertext"].hex(),
                    "expect": expect_error(VerificationError),
                }
            )
        # Plaintexts altered after signing, then encrypted as the sealer would.
        short = self.reports["report-short-body"]
        plain: bytes = short["plaintext"]
        raw_specs: list[tuple[str, str, bytes, bool]] = [
            (
                "report-nonzero-padding",
                "The last padding byte is 01 instead of 00.",
                plain[:-1] + b"\x01",
                True,
            ),
            (
                "report-not-final",
                "The only chunk is tagged MESSAGE, not FINAL.",
                plain,
                False,
            ),
            (
                "report-body-altered-after-signing",
                "A body byte changed after the header was signed (the signature covers the "
                "header; the token's digest is what binds the content).",
                _flip(plain, 4 + len(short["header"]) + 64),
                True,
            ),
        ]
        for vector_id, description, plaintext, final in raw_specs:
            report_id = short["report_id"]
            key = short["content_key"]
            fresh = encrypt(plaintext, key, report_id, final=final)
            ciphertext = self._reuse(vector_id, fresh, key, report_id, plaintext, final)
            sealed = {**short, "ciphertext": ciphertext}
            vector: dict[str, Any] = {
                "id": vector_id,
                "description": description,
                "generated": "random secretstream header; checked by decrypting",
                "open": self._open_params(sealed, "tokyo"),
                "ciphertext": ciphertext.hex(),
                "expect": expect_error(VerificationError),
            }
            if vector_id == "report-body-altered-after-signing":
                # The digest was taken of the honest ciphertext; with the altered one's
                # digest the report would open, which is why the token must be checked.
                vector["open"]["digest"] = digest(Hash.CIPHERTEXT, short["ciphertext"]).hex()
            out.append(vector)
        return out

    def _check_report(self, vector: dict[str, Any]) -> None:
        by_id = {vid: {"ciphertext": s["ciphertext"].hex()} for vid, s in self.reports.items()}
        data = _report_ciphertext(vector, by_id)
        verdict = outcome(lambda: _open(vector["open"], data))
        _require(vector, verdict)

    # --- tokens ------------------------------------------------------------------------

    def token_file(self) -> dict[str, Any]:
        report = self.reports["report-short-body"]
        base_id = "token-valid"
        token_id = derive("token-id/valid", 16)
        base = _tokyos_token(report, token_id, "valid", PREKEY_ENCODED["one-time-1"])
        body = enc.unpack(enc.unpack(base)["body"])
        relay_params = {
            "report_id": report["report_id"],
            "digest": digest(Hash.CIPHERTEXT, report["ciphertext"]),
            "size": len(report["ciphertext"]),
            "originator": "seoul",
        }

        def relay(expected: dict[str, Any], **changes: Any) -> dict[str, Any]:
            check = {
                "check": "relay",
                "arrangement": "v1",
                "now": NOW,
                "clock_skew": CLOCK_SKEW,
                **relay_params,
            }
            check.update(changes)
            return {**hexed(check), "expect": expected}

        def recipient(expected: dict[str, Any], **changes: Any) -> dict[str, Any]:
            check = {
                "check": "recipient",
                "as": "tokyo",
                "arrangement": "v1",
                "now": NOW,
                "clock_skew": CLOCK_SKEW,
            }
            check.update(changes)
            return {**hexed(check), "expect": expected}

        opaque = expect_error(VerificationError)
        malformed = expect_error(ProtocolError)
        ok_relay = expect_ok(token_id=token_id)
        ok_recipient = expect_ok(token_id=token_id, content_key=report["content_key"])
        vectors: list[dict[str, Any]] = []

        def add(
            vector_id: str, description: str, token: bytes, checks: list[dict[str, Any]]
        ) -> None:
            vectors.append(
                {
                    "id": vector_id,
                    "description": description,
                    "token": token.hex(),
                    "checks": checks,
                }
            )

        vectors.append(
            {
                "id": base_id,
                "description": "Seoul releases report-short-body to Tokyo, the key wrapped to "
                "Tokyo's identity, signed prekey and one-time prekey.",
                "inputs": hexed(
                    {
                        "originator": "seoul",
                        "arrangement": "v1",
                        "recipient": "tokyo",
                        "report": "report-short-body",
                        "token_id": token_id,
                        "content_key": report["content_key"],
                        "not_before": NOT_BEFORE,
                        "not_after": NOT_AFTER,
                        "counter": 1,
                        "scope": "missile",
                        "level": "secret",
                        "key_commit": key_commitment(report["content_key"], report["report_id"]),
                        "ephemeral_secret": derive("token-ephemeral/valid"),
                        "signed_prekey": "signed",
                        "one_time_prekey": "one-time-1",
                    }
                ),
                "body": enc.unpack(base)["body"].hex(),
                "token": base.hex(),
                "checks": [
                    relay(ok_relay),
                    recipient(ok_recipient),
                    relay(ok_relay, now=NOT_BEFORE - CLOCK_SKEW),
                    relay(ok_relay, now=NOT_AFTER + CLOCK_SKEW - 1),
                    recipient(ok_recipient, now=NOT_AFTER + CLOCK_SKEW - 1),
                ],
            }
        )
        add(
            "token-expired",
            "Checked at not_after + clock skew: expired (one second earlier it is valid).",
            base,
            [
                relay(expect_error(Refused, "expired"), now=NOT_AFTER + CLOCK_SKEW),
                recipient(expect_error(Refused, "expired"), now=NOT_AFTER + CLOCK_SKEW),
            ],
        )
        add(
            "token-not-yet-valid",
            "Checked one second before not_before - clock skew.",
            base,
            [
                relay(expect_error(Refused, "not_yet_valid"), now=NOT_BEFORE - CLOCK_SKEW - 1),
                recipient(expect_error(Refused, "not_yet_valid"), now=NOT_BEFORE - CLOCK_SKEW - 1),
            ],
        )
        add(
            "token-wrong-recipient",
            "Tokyo's token presented by Seoul.",
            base,
            [recipient(expect_error(Refused, "wrong_recipient"), **{"as": "seoul"})],
        )
        add(
            "token-wrong-arrangement",
            "Checked under version 2 of the arrangement.",
            base,
            [
                relay(expect_error(Refused, "wrong_arrangement"), arrangement="v2"),
                recipient(expect_error(Refused, "wrong_arrangement"), arrangement="v2"),
            ],
        )
        add(
            "token-wrong-report",
            "The relay holds another report under this id, digest or size.",
            base,
            [
                relay(expect_error(Refused, "wrong_report"), report_id=bytes(16)),
                relay(expect_error(Refused, "wrong_report"), digest=bytes(32)),
                relay(expect_error(Refused, "wrong_report"), size=relay_params["size"] + 17),
            ],
        )
        add(
            "token-wrong-originator",
            "Tokyo submitted the report the token (signed by Seoul) names.",
            base,
            [relay(expect_error(Refused, "wrong_originator"), originator="tokyo")],
        )
        signed_changes: list[tuple[str, str, dict[str, Any], str]] = [
            (
                "token-wrong-relay",
                "Signed by Seoul, naming Tokyo as relay.",
                {"relay": "tokyo"},
                "wrong_relay",
            ),
            (
                "token-out-of-scope",
                "Signed by Seoul, scope chemical.",
                {"scope": "chemical"},
                "out_of_scope",
            ),
            (
                "token-level-not-allowed",
                "Signed by Seoul, level cosmic.",
                {"level": "cosmic"},
                "level_not_allowed",
            ),
            (
                "token-recipient-not-a-member",
                "Signed by Seoul, for Beijing.",
                {"recipient": "beijing"},
                "not_a_member",
            ),
            (
                "token-recipient-is-relay",
                "Signed by Seoul, for Washington.",
                {"recipient": "washington"},
                "wrong_role",
            ),
        ]
        for vector_id, description, changes, reason in signed_changes:
            add(
                vector_id,
                description,
                resign(base, SECRETS["seoul"], **changes),
                [relay(expect_error(Refused, reason))],
            )
        # Names (section 3.3): only U+0000..U+001F and U+007F are refused (malformed);
        # U+0085 and U+2028 are text like any other, so the name is merely not a member.
        for vector_id, odd_name, expected in [
            ("token-recipient-name-with-nel", "tokyo\u0085", expect_error(Refused, "not_a_member")),
            (
                "token-recipient-name-with-line-separator",
                "tokyo\u2028",
                expect_error(Refused, "not_a_member"),
            ),
            ("token-recipient-name-with-unit-separator", "tokyo\x1f", malformed),
            ("token-recipient-name-with-delete", "tokyo\x7f", malformed),
        ]:
            add(
                vector_id,
                f"Signed by Seoul, for {odd_name!r}.",
                resign(base, SECRETS["seoul"], recipient=odd_name),
                [relay(expected)],
            )
        # Tampered fields: each changed to another value that still fits the schema,
        # signature kept.
        replacements = {
            "originator": "tokyo",
            "relay": "tokyo",
            "recipient": "seoul",
            "scope": "nuclear",
            "level": "restricted",
        }
        signature = enc.unpack(base)["sig"]
        for field in sorted(body):
            value = body[field]
            new: Any
            if field in replacements:
                new = replacements[field]
            elif isinstance(value, bytes):
                new = _flip(value, len(value) - 1)
            elif isinstance(value, dict):
                new = {**value, "eph": _flip(value["eph"], 31)}
            else:
                new = value + 1
            tampered = enc.pack({"body": enc.pack({**body, field: new}), "sig": signature})
            expected = malformed if field == "v" else opaque
            add(
                f"token-tampered-field-{field.replace('_', '-')}",
                f"{field} changed to {hexed(new)!r} without signing again.",
                tampered,
                [relay(expected), recipient(expected)],
            )
        add(
            "token-wrong-context",
            "The body signed by Seoul in context receipt.",
            resign(base, SECRETS["seoul"], context=Context.RECEIPT),
            [relay(opaque), recipient(opaque)],
        )
        add(
            "token-signed-by-other-member",
            "The body signed by Tokyo.",
            resign(base, SECRETS["tokyo"]),
            [relay(opaque), recipient(opaque)],
        )
        add(
            "token-unlisted-originator",
            "Names Beijing as originator: no key to check with.",
            resign(base, SECRETS["seoul"], originator="beijing"),
            [relay(opaque, originator="beijing"), recipient(opaque)],
        )
        add(
            "token-malleated-signature",
            "The signature's S replaced by S + L.",
            enc.pack({"body": enc.unpack(base)["body"], "sig": malleate(signature)}),
            [relay(opaque), recipient(opaque)],
        )
        add(
            "token-key-commit-mismatch",
            "Signed by Seoul with a commitment to another key: the relay cannot tell.",
            resign(
                base, SECRETS["seoul"], key_commit=key_commitment(bytes(32), report["report_id"])
            ),
            [relay(ok_relay), recipient(opaque)],
        )
        add(
            "token-sealed-to-other-recipient",
            "Re-addressed by Seoul to Canberra, the key still wrapped to Tokyo's prekeys, "
            "which Canberra does not hold (and would not open with its identity key).",
            resign(base, SECRETS["seoul"], recipient="canberra"),
            [
                recipient(expect_error(Refused, "unknown_prekey"), **{"as": "canberra"}),
                recipient(expect_error(Refused, "wrong_recipient")),
            ],
        )
        self._prekey_token_vectors(base, add, relay, recipient, report, token_id)
        body_bytes = enc.unpack(base)["body"]
        keys = sorted(body, key=str.encode)
        counter_key = msgpack.packb("counter")
        at = body_bytes.index(counter_key) + len(counter_key)
        assert body_bytes[at] == 1 and body_bytes[0] == 0xDE  # fixint 1; a map16
        noncanonical = [
            (
                "token-noncanonical-map-order",
                "The envelope's keys in reverse order (sig before body).",
                _map_in_order({"body": body_bytes, "sig": signature}, ["sig", "body"]),
            ),
            (
                "token-noncanonical-body-map-order",
                "The body's keys in reverse order, signed by Seoul over those exact bytes.",
                _sign_body(_map_in_order(body, list(reversed(keys)))),
            ),
            (
                "token-noncanonical-integer",
                "The counter as a uint64 instead of a fixint, signed by Seoul.",
                _sign_body(
                    body_bytes[:at] + b"\xcf" + (1).to_bytes(8, "big") + body_bytes[at + 1 :]
                ),
            ),
            (
                "token-noncanonical-bin32",
                "The body's length as bin32 instead of bin16.",
                b"\x82\xa4body\xc6"
                + len(body_bytes).to_bytes(4, "big")
                + body_bytes
                + b"\xa3sig\xc4\x40"
                + signature,
            ),
            ("token-trailing-byte", "A byte after the envelope.", base + b"\x00"),
            (
                "token-duplicate-key",
                "The body with a second 'v' key, signed by Seoul.",
                _sign_body(
                    bytes([body_bytes[0]])
                    + (len(body) + 1).to_bytes(2, "big")
                    + body_bytes[3:]
                    + msgpack.packb("v")
                    + b"\x01"
                ),
            ),
        ]
        for vector_id, description, token in noncanonical:
            add(vector_id, description, token, [relay(malformed), recipient(malformed)])
        # The optional "request" field (protocol version 2): a token that approves a
        # release request. Present only in such tokens, never nil.
        request_id = derive("request-id", 16)
        add(
            "token-approves-request",
            "Seoul's token with the optional request field: it approves Tokyo's request "
            f"{request_id.hex()} (body with 18 keys, a map16). Issued like token-valid, "
            "ephemeral key from 'token-ephemeral/approves-request'; the key wrap "
            "authenticates the request field with the rest of the body.",
            _tokyos_token(
                report,
                token_id,
                "approves-request",
                PREKEY_ENCODED["one-time-1"],
                request=request_id,
            ),
            [relay(ok_relay), recipient(ok_recipient)],
        )
        add(
            "token-request-added-not-rewrapped",
            "token-valid with a request field added and signed again by Seoul, its wrap "
            "left as it was: the relay accepts it (it cannot open the wrap), the recipient "
            "cannot unwrap the key (the wrap authenticates the body without the request).",
            resign(base, SECRETS["seoul"], request=request_id),
            [relay(ok_relay), recipient(opaque)],
        )
        add(
            "token-request-added-unsigned",
            "A request field added to the valid token without signing again.",
            enc.pack({"body": enc.pack({**body, "request": request_id}), "sig": signature}),
            [relay(opaque), recipient(opaque)],
        )
        for vector_id, description, value in (
            ("token-request-nil", "The request field present as nil.", None),
            ("token-request-short", "A request id of 15 bytes.", request_id[:15]),
        ):
            add(
                vector_id,
                description + " Signed by Seoul.",
                resign(base, SECRETS["seoul"], request=value),
                [relay(malformed), recipient(malformed)],
            )
        for vector in vectors:
            token = bytes.fromhex(vector["token"])
            for check in vector["checks"]:
                verdict = outcome(functools.partial(_check_token, token, check))
                _require(vector, verdict, check["expect"])
        return {
            "description": "Release tokens. Run each entry of 'checks' (check_for_relay or "
            "check_for_recipient with the given parameters) on 'token'. The recipient holds "
            "the secrets of its prekeys listed in 'prekeys' (all of them, or those in the "
            "check's 'held'); a one-time prekey in the check's 'used' was used and deleted "
            "before (naming it again is refused as replayed).",
            "prekeys": {
                "tokyo": {
                    label: hexed(
                        {
                            "kind": secret.kind.value,
                            "secret": secret.secret,
                            "public": secret.public,
                            "encoded": PREKEY_ENCODED[label],
                        }
                    )
                    for label, secret in TOKYO_PREKEYS.items()
                }
            },
            "vectors": vectors,
        }

    def _prekey_token_vectors(
        self,
        base: bytes,
        add: Callable[[str, str, bytes, list[dict[str, Any]]], None],
        relay: Callable[..., dict[str, Any]],
        recipient: Callable[..., dict[str, Any]],
        report: Mapping[str, Any],
        token_id: bytes,
    ) -> None:
        """The forward-secrecy vectors: wrap modes, forgotten and replayed prekeys."""
        ok_recipient = expect_ok(token_id=token_id, content_key=report["content_key"])
        signed_only = _tokyos_token(report, token_id, "signed-only", None)
        add(
            "token-signed-prekey-only",
            "Tokyo's one-time supply was exhausted: wrapped to its identity and signed "
            "prekey alone (mode signed, no opk).",
            signed_only,
            [relay(expect_ok(token_id=token_id)), recipient(ok_recipient)],
        )
        body = enc.unpack(enc.unpack(base)["body"])
        wrap = body["wrap"]
        one_time = wrap["opk"].hex()
        add(
            "token-prekey-forgotten",
            "Tokyo deleted the prekey secrets the token names: nothing opens it.",
            base,
            [
                recipient(expect_error(Refused, "unknown_prekey"), held=[]),
                recipient(expect_error(Refused, "unknown_prekey"), held=[one_time]),
            ],
        )
        add(
            "token-one-time-prekey-replayed",
            "The one-time prekey was used by an earlier token and deleted.",
            base,
            [recipient(expect_error(Refused, "replayed"), used=[one_time])],
        )
        identity = dict(wrap, mode="identity", spk=None, opk=None)
        add(
            "token-identity-not-allowed",
            "Wrapped to the long-term key alone (mode identity) under an arrangement without "
            "identity_fallback.",
            resign(base, SECRETS["seoul"], wrap=identity),
            [
                relay(expect_error(Refused, "fallback_not_allowed")),
                recipient(expect_error(Refused, "fallback_not_allowed")),
            ],
        )
        malformed = expect_error(ProtocolError)
        for vector_id, description, changed in (
            ("token-wrap-mode-mismatch", "Mode signed, but an opk named.", {"mode": "signed"}),
            ("token-wrap-no-signed-prekey", "Mode one_time without an spk.", {"spk": None}),
            (
                "token-wrap-short-sealed",
                "The sealed key one byte short.",
                {"sealed": wrap["sealed"][:-1]},
            ),
        ):
            add(
                vector_id,
                description + " Signed by Seoul.",
                resign(base, SECRETS["seoul"], wrap={**wrap, **changed}),
                [relay(malformed), recipient(malformed)],
            )
        add(
            "token-wrap-under-other-fields",
            "Counter changed and signed again by Seoul, the wrap kept: its associated data "
            "no longer matches (the relay cannot tell).",
            resign(base, SECRETS["seoul"], counter=2),
            [relay(expect_ok(token_id=token_id)), recipient(expect_error(VerificationError))],
        )

    # --- prekeys -----------------------------------------------------------------------

    def prekey_file(self) -> dict[str, Any]:
        signed, one_time = PREKEY_ENCODED["signed"], PREKEY_ENCODED["one-time-1"]
        body = enc.unpack(enc.unpack(signed)["body"])
        vectors: list[dict[str, Any]] = []
        opaque = expect_error(VerificationError)
        malformed = expect_error(ProtocolError)

        def add(
            vector_id: str,
            description: str,
            encoded: bytes,
            expect: dict[str, Any],
            **check: Any,
        ) -> None:
            params = {"owner": "tokyo", "kind": "signed", "arrangement": "v1", "now": NOW, **check}
            vector = {
                "id": vector_id,
                "description": description,
                "encoded": encoded.hex(),
                "check": params,
                "expect": expect,
            }
            _require(vector, outcome(functools.partial(_check_prekey, vector)))
            vectors.append(vector)

        def sign(
            changes: Mapping[str, Any], signer: str = "tokyo", context: Context = Context.PREKEY
        ) -> bytes:
            data = enc.pack({**body, **changes})
            return enc.pack({"body": data, "sig": SECRETS[signer].sign(context, data)})

        add(
            "prekey-signed-valid",
            "Tokyo's signed prekey, as the relay hands it out.",
            signed,
            expect_ok(key=TOKYO_PREKEYS["signed"].public),
        )
        add(
            "prekey-one-time-valid",
            "One of Tokyo's one-time prekeys.",
            one_time,
            expect_ok(key=TOKYO_PREKEYS["one-time-1"].public),
            kind="one_time",
        )
        add(
            "prekey-substituted-owner",
            "Tokyo's prekey handed out as Seoul's.",
            signed,
            expect_error(Refused, "bad_prekey"),
            owner="seoul",
        )
        add(
            "prekey-substituted-kind",
            "Tokyo's signed prekey handed out as a one-time prekey.",
            signed,
            expect_error(Refused, "bad_prekey"),
            kind="one_time",
        )
        add(
            "prekey-other-arrangement",
            "Checked under version 2 of the arrangement.",
            signed,
            expect_error(Refused, "bad_prekey"),
            arrangement="v2",
        )
        add(
            "prekey-expired",
            "Checked at not_after + clock skew.",
            signed,
            expect_error(Refused, "expired"),
            now=PREKEY_NOT_AFTER + CLOCK_SKEW,
        )
        add(
            "prekey-forged-by-relay",
            "A key of the relay's choosing, signed by Washington in Tokyo's name.",
            sign({"key": sodium.crypto_scalarmult_base(derive("prekey/relay"))}, "washington"),
            opaque,
        )
        add(
            "prekey-signed-by-other-member",
            "Names Tokyo as owner, signed by Seoul.",
            sign({}, "seoul"),
            opaque,
        )
        add(
            "prekey-wrong-context",
            "Signed by Tokyo in context token.",
            sign({}, context=Context.TOKEN),
            opaque,
        )
        add(
            "prekey-owner-is-relay",
            "Names Washington (no recipient role, so no key to check with) as owner.",
            sign({"owner": "washington"}, "washington"),
            opaque,
            owner="washington",
        )
        add(
            "prekey-low-order-key",
            "A key of low order (the all-zero point), signed by Tokyo.",
            sign({"key": bytes(32)}),
            malformed,
        )
        add(
            "prekey-empty-lifetime",
            "not_after equal to created, signed by Tokyo.",
            sign({"not_after": body["created"]}),
            malformed,
        )
        add(
            "prekey-version-1",
            "v 1, signed by Tokyo: prekeys exist from protocol version 2.",
            sign({"v": 1}),
            malformed,
        )
        add("prekey-trailing-byte", "A byte after the envelope.", signed + b"\x00", malformed)
        return {
            "description": "Prekeys. Check 'encoded' with Prekey.verify for the owner, kind, "
            "arrangement and time in 'check' (clock skew 120 s).",
            "vectors": vectors,
        }

    # --- receipts, acks, checkpoints ---------------------------------------------------

    def receipt_file(self) -> dict[str, Any]:
        report = self.reports["report-short-body"]
        report_digest = digest(Hash.CIPHERTEXT, report["ciphertext"])
        issued: dict[str, tuple[bytes, Context, str]] = {
            "receipt": (
                Receipt.issue(
                    SECRETS["tokyo"],
                    V1,
                    report=report["report_id"],
                    token=derive("token-id/valid", 16),
                    originator="seoul",
                    recipient="tokyo",
                    digest=report_digest,
                    received=NOW + 5,
                ).encoded,
                Context.RECEIPT,
                "tokyo",
            ),
            "ack": (
                StoredAck.issue(
                    SECRETS["washington"],
                    V1,
                    report=report["report_id"],
                    originator="seoul",
                    digest=report_digest,
                    size=len(report["ciphertext"]),
                    stored=NOW + 1,
                ).encoded,
                Context.ACK,
                "washington",
            ),
            "checkpoint": (
                Checkpoint.issue(
                    SECRETS["washington"], V1, seq=3, head=derive("audit-head"), time=NOW + 10
                ).encoded,
                Context.AUDIT,
                "washington",
            ),
        }
        vectors = _signed_object_vectors(issued)
        # Signed by the right member, but naming an originator that could not have sent
        # the report (section 11): refused by policy, after the signature.
        originators: list[tuple[str, str, str, str]] = [
            ("receipt", "relay", "washington", "wrong_role"),
            ("receipt", "not-a-member", "beijing", "not_a_member"),
            ("receipt", "is-recipient", "tokyo", "wrong_recipient"),
            ("ack", "recipient-only", "canberra", "wrong_role"),
            ("ack", "not-a-member", "beijing", "not_a_member"),
        ]
        for kind, label, originator, reason in originators:
            encoded, context, signer = issued[kind]
            vectors.append(
                {
                    "id": f"{kind}-originator-{label}",
                    "kind": kind,
                    "description": f"Signed by {signer}, naming {originator} as originator.",
                    "arrangement": "v1",
                    "encoded": resign(
                        encoded, SECRETS[signer], context=context, originator=originator
                    ).hex(),
                    "expect": expect_error(Refused, reason),
                }
            )
        for vector in vectors:
            verdict = outcome(functools.partial(_verify_signed, vector))
            _require(vector, verdict)
        return {
            "description": "Receipts (signed by the recipient), stored-acks and audit "
            "checkpoints (signed by the relay). Verify 'encoded' with Receipt.verify, "
            "StoredAck.verify or Checkpoint.verify under the arrangement given.",
            "vectors": vectors,
        }

    # --- consent: announcements, requests, denials --------------------------------------

    def consent_file(self) -> dict[str, Any]:
        report = self.reports["report-short-body"]
        request = Request.issue(
            SECRETS["tokyo"],
            "tokyo",
            V1,
            originator="seoul",
            report=report["report_id"],
            purpose="Tokyo assesses the launch of 26 March",
            now=NOW,
            valid_for=7 * 86_400,
            _id=derive("request-id", 16),
        )
        issued: dict[str, tuple[bytes, Context, str]] = {
            "announcement": (
                Announcement.issue(
                    SECRETS["seoul"],
                    "seoul",
                    V1,
                    report=report["report_id"],
                    to=["tokyo", "canberra"],
                    scope="missile",
                    level="secret",
                    size=len(report["ciphertext"]),
                    title="Two Nodong launches, 26 March",
                    now=NOW,
                    _id=derive("announcement-id", 16),
                ).encoded,
                Context.ANNOUNCE,
                "seoul",
            ),
            "request": (request.encoded, Context.REQUEST, "tokyo"),
            "answer": (
                Answer.deny(
                    SECRETS["seoul"],
                    "seoul",
                    V1,
                    request,
                    reason="level_not_allowed",
                    note="not at this level before the consultations",
                    now=NOW + 3600,
                ).encoded,
                Context.ANSWER,
                "seoul",
            ),
        }
        vectors = _signed_object_vectors(issued)
        announcement, request_bytes, answer = (issued[k][0] for k in issued)
        specific = [
            (
                "announcement-recipients-unsorted",
                "announcement",
                "'to' as [tokyo, canberra], not in byte order; signed by Seoul.",
                resign(
                    announcement,
                    SECRETS["seoul"],
                    context=Context.ANNOUNCE,
                    to=["tokyo", "canberra"],
                ),
                expect_error(ProtocolError),
            ),
            (
                "announcement-to-the-relay",
                "announcement",
                "Announced to Washington, which is no recipient; signed by Seoul.",
                resign(announcement, SECRETS["seoul"], context=Context.ANNOUNCE, to=["washington"]),
                expect_error(Refused, "wrong_role"),
            ),
            (
                "announcement-size-bucket-too-large",
                "announcement",
                "size_bucket 33: no report is larger than 2^32 bytes; signed by Seoul.",
                resign(announcement, SECRETS["seoul"], context=Context.ANNOUNCE, size_bucket=33),
                expect_error(ProtocolError),
            ),
            (
                "request-empty-window",
                "request",
                "expires equal to time; signed by Tokyo.",
                resign(request_bytes, SECRETS["tokyo"], context=Context.REQUEST, expires=NOW),
                expect_error(ProtocolError),
            ),
            (
                "request-window-too-long",
                "request",
                "Valid for 30 days and one second; signed by Tokyo.",
                resign(
                    request_bytes,
                    SECRETS["tokyo"],
                    context=Context.REQUEST,
                    expires=NOW + 30 * 86_400 + 1,
                ),
                expect_error(ProtocolError),
            ),
            (
                "request-to-itself",
                "request",
                "Tokyo asks itself; signed by Tokyo.",
                resign(
                    request_bytes, SECRETS["tokyo"], context=Context.REQUEST, originator="tokyo"
                ),
                expect_error(Refused, "wrong_recipient"),
            ),
            (
                "request-to-a-non-originator",
                "request",
                "Tokyo asks Canberra, which originates nothing; signed by Tokyo.",
                resign(
                    request_bytes, SECRETS["tokyo"], context=Context.REQUEST, originator="canberra"
                ),
                expect_error(Refused, "wrong_role"),
            ),
            (
                "request-empty-purpose",
                "request",
                "An empty purpose; signed by Tokyo.",
                resign(request_bytes, SECRETS["tokyo"], context=Context.REQUEST, purpose=""),
                expect_error(ProtocolError),
            ),
            (
                "answer-not-a-denial-code",
                "answer",
                "reason 'approved': an approval is a token, never an answer; signed by Seoul.",
                resign(answer, SECRETS["seoul"], context=Context.ANSWER, reason="approved"),
                expect_error(ProtocolError),
            ),
            (
                "answer-by-a-recipient-only",
                "answer",
                "Names Canberra (no originator) as the answering originator; signed by it.",
                resign(answer, SECRETS["canberra"], context=Context.ANSWER, originator="canberra"),
                expect_error(VerificationError),
            ),
        ]
        for vector_id, kind, description, data, expected in specific:
            vectors.append(
                {
                    "id": vector_id,
                    "kind": kind,
                    "description": description,
                    "arrangement": "v1",
                    "encoded": data.hex(),
                    "expect": expected,
                }
            )
            _require(vectors[-1], outcome(functools.partial(_verify_signed, vectors[-1])))
        return {
            "description": "Announcements (signed by the originator), release requests "
            "(signed by the requester) and denials (signed by the originator). Verify "
            "'encoded' with Announcement.verify, Request.verify or Answer.verify under the "
            "arrangement given. An approval is a token with the request field (token.json, "
            "token-approves-request).",
            "vectors": vectors,
        }


def _signed_object_vectors(
    issued: Mapping[str, tuple[bytes, Context, str]],
) -> list[dict[str, Any]]:
    """For each kind's valid encoding (with its context and signer): the valid vector, each
    field tampered without signing again, wrong context, wrong signer, another arrangement
    version, a malleated signature, a non-canonical envelope; every verdict checked."""
    vectors: list[dict[str, Any]] = []
    for kind, (encoded, context, signer) in issued.items():
        body = enc.unpack(enc.unpack(encoded)["body"])
        signature = enc.unpack(encoded)["sig"]
        fields = {k: v for k, v in body.items() if k != "v"}

        def add(
            vector_id: str,
            description: str,
            data: bytes,
            expected: dict[str, Any],
            arrangement: str = "v1",
            k: str = kind,
        ) -> None:
            vectors.append(
                {
                    "id": vector_id,
                    "kind": k,
                    "description": description,
                    "arrangement": arrangement,
                    "encoded": data.hex(),
                    "expect": expected,
                }
            )

        add(f"{kind}-valid", f"A {kind} signed by {signer}.", encoded, expect_ok(**fields))
        for field in sorted(body):
            value = body[field]
            if isinstance(value, bytes):
                new: Any = _flip(value, 0)
            elif isinstance(value, int):
                new = value + 1
            elif isinstance(value, list):
                new = ["canberra"]  # still a sorted list of recipients
            elif field == "reason":
                new = "denied" if value != "denied" else "unavailable"  # still a denial code
            else:
                new = "seoul" if value != "seoul" else "tokyo"
            data = enc.pack({"body": enc.pack({**body, field: new}), "sig": signature})
            add(
                f"{kind}-tampered-field-{field}",
                f"{field} changed without signing again.",
                data,
                expect_error(ProtocolError if field == "v" else VerificationError),
            )
        others = [c for c in Context if c is not context]
        add(
            f"{kind}-wrong-context",
            f"Signed by {signer} in context {others[0].value.decode()}.",
            resign(encoded, SECRETS[signer], context=others[0]),
            expect_error(VerificationError),
        )
        wrong_signer = "seoul" if signer != "seoul" else "tokyo"
        add(
            f"{kind}-wrong-signer",
            f"Signed by {wrong_signer} instead of {signer}.",
            resign(encoded, SECRETS[wrong_signer], context=context),
            expect_error(VerificationError),
        )
        add(
            f"{kind}-wrong-arrangement",
            "Verified under version 2 (same keys).",
            encoded,
            expect_error(Refused, "wrong_arrangement"),
            arrangement="v2",
        )
        add(
            f"{kind}-malleated-signature",
            "The signature's S replaced by S + L.",
            enc.pack({"body": enc.unpack(encoded)["body"], "sig": malleate(signature)}),
            expect_error(VerificationError),
        )
        add(
            f"{kind}-noncanonical-map-order",
            "The envelope's keys in reverse order.",
            _map_in_order(enc.unpack(encoded), ["sig", "body"]),
            expect_error(ProtocolError),
        )
    for vector in vectors:
        verdict = outcome(functools.partial(_verify_signed, vector))
        _require(vector, verdict)
    return vectors


# --- canonical encoding (section 3.1) ----------------------------------------------------


def _nested(levels: int, *, maps: bool = False, inner: Any = None) -> dict[str, Any]:
    """A top-level map and ``levels - 1`` containers inside it, one in the other; the
    innermost is empty, or holds ``inner``."""
    if maps:
        value: Any = {} if inner is None else {"a": inner}
    else:
        value = [] if inner is None else [inner]
    for _ in range(levels - 2):
        value = {"a": value} if maps else [value]
    return {"a": value}


def _raw_map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A fixmap of already-encoded (key, value) pairs, in the order given."""
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def encoding_file() -> dict[str, Any]:
    """Canonical msgpack: inputs that decode (``tisa.encoding.unpack``) and inputs that
    are malformed, whatever schema would apply next."""

    def packed(value: Any) -> bytes:
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data

    key_a, key_b = packed("a"), packed("b")
    one = packed(1)
    specs: list[tuple[str, str, bytes, bool]] = [
        (
            "encoding-depth-8-lists",
            "A map holding 7 nested arrays: 8 levels.",
            packed(_nested(8)),
            True,
        ),
        (
            "encoding-depth-9-lists",
            "A map holding 8 nested arrays: 9 levels.",
            packed(_nested(9)),
            False,
        ),
        ("encoding-depth-8-maps", "8 maps, one in the other.", packed(_nested(8, maps=True)), True),
        (
            "encoding-depth-9-maps",
            "9 maps, one in the other.",
            packed(_nested(9, maps=True)),
            False,
        ),
        (
            "encoding-depth-8-scalar-innermost",
            "8 levels of containers with an integer in the innermost: scalars add no level.",
            packed(_nested(8, inner=1)),
            True,
        ),
        (
            "encoding-depth-9-empty-map-innermost",
            "8 levels, and an empty map inside the innermost array: an empty container "
            "is a level too.",
            packed(_nested(8, inner={})),
            False,
        ),
        (
            "encoding-keys-sorted",
            "Keys a, ab, b: a prefix sorts first.",
            packed({"a": 1, "ab": 2, "b": 3}),
            True,
        ),
        (
            "encoding-keys-prefix-after",
            "Keys ab then a.",
            _raw_map((packed("ab"), one), (key_a, one)),
            False,
        ),
        (
            "encoding-keys-out-of-order",
            "Keys b then a.",
            _raw_map((key_b, one), (key_a, one)),
            False,
        ),
        (
            "encoding-keys-out-of-order-nested",
            "A canonical outer map whose inner map has keys b then a: every map is checked.",
            _raw_map((key_a, _raw_map((key_b, one), (key_a, one)))),
            False,
        ),
        (
            "encoding-keys-utf8-order",
            "Keys U+FF5E then U+1F600: ascending in UTF-8 bytes (ef.. < f0..), though "
            "not in UTF-16 code units.",
            _raw_map((packed("\uff5e"), one), (packed("\U0001f600"), one)),
            True,
        ),
        (
            "encoding-keys-utf16-order",
            "Keys U+1F600 then U+FF5E: the UTF-16 order, not the UTF-8 one.",
            _raw_map((packed("\U0001f600"), one), (packed("\uff5e"), one)),
            False,
        ),
        ("encoding-duplicate-key", "Key a twice.", _raw_map((key_a, one), (key_a, one)), False),
        ("encoding-key-not-text", "An integer key.", _raw_map((one, one)), False),
        ("encoding-key-bin", "A key encoded as bin.", _raw_map((b"\xc4\x01a", one)), False),
        ("encoding-int-long-form", "5 as uint8 (cc 05).", _raw_map((key_a, b"\xcc\x05")), False),
        ("encoding-int-signed-form", "5 as int8 (d0 05).", _raw_map((key_a, b"\xd0\x05")), False),
        ("encoding-int-negative", "-33 as int8 (d0 df).", _raw_map((key_a, b"\xd0\xdf")), True),
        (
            "encoding-int-negative-long-form",
            "-1 as int8 (d0 ff) instead of a negative fixint.",
            _raw_map((key_a, b"\xd0\xff")),
            False,
        ),
        ("encoding-int-uint64-max", "2^64 - 1.", packed({"a": 2**64 - 1}), True),
        ("encoding-str8-short", "Text of 1 byte as str8.", _raw_map((key_a, b"\xd9\x01x")), False),
        (
            "encoding-bin-empty",
            "An empty byte string (c4 00).",
            _raw_map((key_a, b"\xc4\x00")),
            True,
        ),
        (
            "encoding-map16-small",
            "A map of 1 entry as map16.",
            b"\xde\x00\x01" + key_a + one,
            False,
        ),
        ("encoding-float64", "A float64.", _raw_map((key_a, b"\xcb" + bytes(8))), False),
        ("encoding-float32", "A float32.", _raw_map((key_a, b"\xca" + bytes(4))), False),
        ("encoding-ext", "An extension type (fixext1).", _raw_map((key_a, b"\xd4\x01\x00")), False),
        (
            "encoding-timestamp",
            "A msgpack timestamp (ext -1, fixext4).",
            _raw_map((key_a, b"\xd6\xff" + bytes(4))),
            False,
        ),
        ("encoding-never-used", "The byte c1.", _raw_map((key_a, b"\xc1")), False),
        ("encoding-invalid-utf8", "Text that is not UTF-8.", _raw_map((key_a, b"\xa1\xff")), False),
        ("encoding-trailing-byte", "A byte after the map.", packed({"a": 1}) + b"\x00", False),
        ("encoding-top-level-array", "An array at the top.", packed([1]), False),
        ("encoding-empty-map", "The empty map.", b"\x80", True),
        ("encoding-truncated", "A map that ends early.", packed({"a": 1})[:-1], False),
    ]
    vectors = []
    for vector_id, description, data, valid in specs:
        vector = {
            "id": vector_id,
            "description": description,
            "encoded": data.hex(),
            "expect": expect_ok() if valid else expect_error(ProtocolError),
        }
        _require(vector, outcome(functools.partial(enc.unpack, data)))
        vectors.append(vector)
    return {
        "description": "Canonical encoding (docs/protocol.md section 3.1). Decode 'encoded' "
        "with tisa.encoding.unpack: it decodes, or it is malformed.",
        "vectors": vectors,
    }


# --- channel messages (section 13.4) ------------------------------------------------------


def _stretch(label: str, size: int) -> bytes:
    """``size`` fixed bytes for ``label`` (derive's 32, repeated)."""
    return (derive(label) * (size // 32 + 1))[:size]


def message_file() -> dict[str, Any]:
    """The channel messages protocol versions 3 and 4 added or changed (submit_inline,
    deliver_inline, stored; prekeys_fetch with its count, prekeys with a list of
    one-time prekeys, ack_receipts), at and past their limits: decode with
    decode_message."""
    report, token_id = derive("message/report", 16), derive("message/token-id", 16)
    digest, small = derive("message/digest"), _stretch("message/ciphertext", 1089)
    token, ack = _stretch("message/token", 486), _stretch("message/ack", 250)
    inline = {"report": report, "digest": digest, "expires": NOW + 3600}

    def submit(data: bytes, tokens: list[bytes], **extra: Any) -> bytes:
        return enc.pack({"t": "submit_inline", **inline, "data": data, "tokens": tokens, **extra})

    full = _stretch("message/full", MAX_INLINE_CIPHERTEXT)
    over = _stretch("message/full", MAX_INLINE_CIPHERTEXT + 1)
    specs: list[tuple[str, str, bytes, bool]] = [
        (
            "message-submit-inline",
            "A 1089-byte report with one token.",
            submit(small, [token]),
            True,
        ),
        ("message-submit-inline-no-token", "A report alone.", submit(small, []), True),
        (
            "message-submit-inline-at-limit",
            "Data of exactly MAX_INLINE_CIPHERTEXT (65,536) bytes.",
            submit(full, []),
            True,
        ),
        (
            "message-submit-inline-over-limit",
            "Data of 65,537 bytes: such a report is streamed (submit, chunk, submit_end).",
            submit(over, []),
            False,
        ),
        ("message-submit-inline-empty", "Empty data.", submit(b"", []), False),
        (
            "message-submit-inline-32-tokens",
            "MAX_INLINE_TOKENS tokens.",
            submit(small, [token] * MAX_INLINE_TOKENS),
            True,
        ),
        (
            "message-submit-inline-33-tokens",
            "One token more than MAX_INLINE_TOKENS.",
            submit(small, [token] * (MAX_INLINE_TOKENS + 1)),
            False,
        ),
        (
            "message-submit-inline-token-too-long",
            "A token of 2049 bytes.",
            submit(small, [b"t" * 2049]),
            False,
        ),
        (
            "message-submit-inline-with-size",
            "A size key as in submit: not a field of submit_inline.",
            submit(small, [], size=len(small)),
            False,
        ),
        (
            "message-deliver-inline",
            "A token and 1089 bytes of ciphertext.",
            enc.pack({"t": "deliver_inline", "token": token, "data": small}),
            True,
        ),
        (
            "message-deliver-inline-at-limit",
            "Data of exactly 65,536 bytes.",
            enc.pack({"t": "deliver_inline", "token": token, "data": full}),
            True,
        ),
        (
            "message-deliver-inline-over-limit",
            "Data of 65,537 bytes: such a delivery is streamed (deliver, chunk, deliver_end).",
            enc.pack({"t": "deliver_inline", "token": token, "data": over}),
            False,
        ),
        (
            "message-stored-released",
            "Stored with one token accepted with the submission.",
            enc.pack({"t": "stored", "report": report, "ack": ack, "released": [token_id]}),
            True,
        ),
        (
            "message-stored-nothing-released",
            "Stored answering a streamed submit: released is empty.",
            enc.pack({"t": "stored", "report": report, "ack": ack, "released": []}),
            True,
        ),
        (
            "message-stored-version-2",
            "Stored as protocol version 2 sent it, without released.",
            enc.pack({"t": "stored", "report": report, "ack": ack}),
            False,
        ),
        (
            "message-stored-33-released",
            "One token id more than MAX_INLINE_TOKENS.",
            enc.pack(
                {
                    "t": "stored",
                    "report": report,
                    "ack": ack,
                    "released": [token_id] * (MAX_INLINE_TOKENS + 1),
                }
            ),
            False,
        ),
    ]
    specs += _prekey_message_specs()
    vectors = []
    for vector_id, description, data, valid in specs:
        vector = {
            "id": vector_id,
            "description": description,
            "encoded": data.hex(),
            "expect": (
                expect_ok(type=enc.unpack(data)["t"]) if valid else expect_error(ProtocolError)
            ),
        }
        _require(vector, outcome(functools.partial(decode_message, data)))
        vectors.append(vector)
    return {
        "description": "Channel messages of protocol versions 3 and 4 (docs/protocol.md "
        "section 13.4): decode 'encoded' with tisa.messages.decode_message; it gives a "
        "message of type expect.type, which encodes back to the same bytes, or it is "
        "malformed.",
        "vectors": vectors,
    }


def _prekey_message_specs() -> list[tuple[str, str, bytes, bool]]:
    """prekeys_fetch and prekeys as protocol version 4 changed them (several bundles of
    one member in one fetch and one answer, at most MAX_PREKEY_BUNDLES), and the
    ack_receipts it added."""
    ref = derive("message/prekeys-ref", 16)
    signed = _stretch("message/signed-prekey", 218)
    one_time = [
        _stretch(f"message/one-time-prekey/{n}", 218) for n in range(MAX_PREKEY_BUNDLES + 1)
    ]

    def fetch(count: Any, **extra: Any) -> bytes:
        return enc.pack(
            {"t": "prekeys_fetch", "ref": ref, "member": "tokyo", "count": count, **extra}
        )

    def answer(keys: Any, signed_prekey: bytes | None = signed) -> bytes:
        return enc.pack(
            {
                "t": "prekeys",
                "ref": ref,
                "member": "tokyo",
                "signed": signed_prekey,
                "one_time": keys,
            }
        )

    return [
        ("message-prekeys-fetch", "A fetch of one bundle.", fetch(1), True),
        (
            "message-prekeys-fetch-at-limit",
            "A fetch of MAX_PREKEY_BUNDLES (32) bundles.",
            fetch(MAX_PREKEY_BUNDLES),
            True,
        ),
        (
            "message-prekeys-fetch-over-limit",
            "A fetch of 33 bundles: malformed (the relay sends error and closes).",
            fetch(MAX_PREKEY_BUNDLES + 1),
            False,
        ),
        ("message-prekeys-fetch-none", "A fetch of 0 bundles.", fetch(0), False),
        (
            "message-prekeys-fetch-version-3",
            "A fetch as protocol version 3 sent it, without count.",
            enc.pack({"t": "prekeys_fetch", "ref": ref, "member": "tokyo"}),
            False,
        ),
        (
            "message-prekeys",
            "The signed prekey and three one-time prekeys (three bundles).",
            answer(one_time[:3]),
            True,
        ),
        (
            "message-prekeys-none-left",
            "The signed prekey alone: none left, or the hourly allowance used up.",
            answer([]),
            True,
        ),
        ("message-prekeys-nothing", "No prekey at all (none published).", answer([], None), True),
        (
            "message-prekeys-at-limit",
            "MAX_PREKEY_BUNDLES one-time prekeys.",
            answer(one_time[:MAX_PREKEY_BUNDLES]),
            True,
        ),
        (
            "message-prekeys-over-limit",
            "One one-time prekey more than MAX_PREKEY_BUNDLES.",
            answer(one_time),
            False,
        ),
        (
            "message-prekeys-version-3",
            "An answer as protocol version 3 sent it: one_time a single prekey, not a list.",
            answer(one_time[0]),
            False,
        ),
        (
            "message-ack-receipts",
            "Two receipt notices acknowledged in one message.",
            enc.pack({"t": "ack_receipts", "tokens": [ref, derive("message/token-id", 16)]}),
            True,
        ),
        (
            "message-ack-receipts-at-limit",
            "MAX_RECEIPT_ACKS (256) token ids.",
            enc.pack({"t": "ack_receipts", "tokens": [ref] * MAX_RECEIPT_ACKS}),
            True,
        ),
        (
            "message-ack-receipts-over-limit",
            "One token id more than MAX_RECEIPT_ACKS.",
            enc.pack({"t": "ack_receipts", "tokens": [ref] * (MAX_RECEIPT_ACKS + 1)}),
            False,
        ),
        (
            "message-ack-receipts-empty",
            "No token id: malformed (at least one).",
            enc.pack({"t": "ack_receipts", "tokens": []}),
            False,
        ),
        (
            "message-prekeys-one-time-too-long",
            "A one-time prekey of 513 bytes (MAX_PREKEY_SIZE is 512).",
            answer([b"p" * 513]),
            False,
        ),
    ]


# --- audit extracts (section 12.3) --------------------------------------------------------


def audit_file() -> dict[str, Any]:
    """Extracts of a four-entry log, verified by a member from the point it knows."""
    report = derive("audit/report", 16)
    token = derive("audit/token", 16)
    entries = [
        AuditEntry(
            seq=1, time=NOW, event=AuditEvent.STORED, report=report, token=None, parties=("seoul",)
        ),
        AuditEntry(
            seq=2,
            time=NOW + 1,
            event=AuditEvent.RELEASED,
            report=report,
            token=token,
            parties=("seoul", "tokyo"),
        ),
        AuditEntry(
            seq=3,
            time=NOW + 2,
            event=AuditEvent.STORED,
            report=derive("audit/other", 16),
            token=None,
            parties=("canberra",),
        ),
        AuditEntry(
            seq=4,
            time=NOW + 3,
            event=AuditEvent.FORWARDED,
            report=report,
            token=token,
            parties=("seoul", "tokyo"),
        ),
    ]
    heads = [GENESIS]
    for entry in entries:
        heads.append(chain_next(heads[-1], entry.content_hash))

    def checkpoint(
        seq: int,
        *,
        head: bytes | None = None,
        signer: str = "washington",
        arrangement: Arrangement = V1,
    ) -> bytes:
        # Signed here rather than by Checkpoint.issue, which refuses a signer not the relay.
        body = {
            "v": 1,
            "arrangement": arrangement.id,
            "seq": seq,
            "head": heads[seq] if head is None else head,
            "time": NOW + 10,
        }
        body_bytes = enc.pack(body)
        return enc.pack(
            {"body": body_bytes, "sig": SECRETS[signer].sign(Context.AUDIT, body_bytes)}
        )

    def extract(member: str, start: int, end: int = 4, **changes: Any) -> dict[str, Any]:
        value = {
            "start_seq": start,
            "start_head": heads[start],
            "items": [
                {"e": e.encode()} if member in e.parties else {"h": e.content_hash}
                for e in entries[start:end]
            ],
            "checkpoint": checkpoint(end),
        }
        value.update(changes)
        return value

    vectors: list[dict[str, Any]] = []

    def add(
        vector_id: str,
        description: str,
        data: bytes,
        expected: dict[str, Any],
        *,
        member: str = "tokyo",
        known: int = 0,
    ) -> None:
        vector = {
            "id": vector_id,
            "description": description,
            "arrangement": "v1",
            "member": member,
            "known": {"seq": known, "head": heads[known].hex()},
            "extract": data.hex(),
            "expect": expected,
        }
        _require(vector, outcome(functools.partial(_verify_extract, vector)))
        vectors.append(vector)

    def ok(member: str, start: int, end: int = 4) -> dict[str, Any]:
        return expect_ok(
            entries=[e.seq for e in entries[start:end] if member in e.parties],
            checkpoint_seq=end,
            checkpoint_head=heads[end],
        )

    opaque = expect_error(VerificationError)
    full = extract("tokyo", 0)
    add(
        "audit-extract-from-genesis",
        "Tokyo's first fetch: entries 2 and 4 in full.",
        enc.pack(full),
        ok("tokyo", 0),
    )
    add(
        "audit-extract-seoul",
        "Seoul's first fetch: entries 1, 2 and 4 in full.",
        enc.pack(extract("seoul", 0)),
        ok("seoul", 0),
        member="seoul",
    )
    add(
        "audit-extract-from-checkpoint",
        "From seq 2, the point Tokyo verified last.",
        enc.pack(extract("tokyo", 2)),
        ok("tokyo", 2),
        known=2,
    )
    add(
        "audit-extract-nothing-new",
        "From seq 4 to the checkpoint at 4: no items.",
        enc.pack(extract("tokyo", 4)),
        ok("tokyo", 4),
        known=4,
    )
    add(
        "audit-extract-trailing-byte",
        "A byte after the extract: malformed.",
        enc.pack(full) + b"\x00",
        expect_error(ProtocolError),
    )
    add(
        "audit-extract-entry-malformed",
        "An item whose entry bytes do not decode: malformed.",
        enc.pack({**full, "items": [full["items"][0], {"e": b"\x80"}, *full["items"][2:]]}),
        expect_error(ProtocolError),
    )
    add(
        "audit-extract-checkpoint-other-arrangement",
        "The relay's checkpoint signed for version 2: refused, as any checkpoint (12.2).",
        enc.pack({**full, "checkpoint": checkpoint(4, arrangement=V2)}),
        expect_error(Refused, "wrong_arrangement"),
    )
    add(
        "audit-extract-checkpoint-signed-by-member",
        "The checkpoint signed by Seoul instead of the relay.",
        enc.pack({**full, "checkpoint": checkpoint(4, signer="seoul")}),
        opaque,
    )
    add(
        "audit-extract-wrong-start",
        "Starts at seq 2 while Tokyo knows seq 0.",
        enc.pack(extract("tokyo", 2)),
        opaque,
    )
    add(
        "audit-extract-rewritten-history",
        "From seq 2, but with another chain head there (a log rebuilt to that length): "
        "it does not continue from the point Tokyo verified.",
        enc.pack(extract("tokyo", 2, start_head=_flip(heads[2], 0))),
        opaque,
        known=2,
    )
    add(
        "audit-extract-hash-altered",
        "The hash standing for entry 1 altered: the chain misses the checkpoint's head.",
        enc.pack({**full, "items": [{"h": _flip(entries[0].content_hash, 0)}, *full["items"][1:]]}),
        opaque,
    )
    add(
        "audit-extract-entry-not-naming-member",
        "Entry 3 (Canberra's) sent to Tokyo in full.",
        enc.pack(
            {**full, "items": [*full["items"][:2], {"e": entries[2].encode()}, full["items"][3]]}
        ),
        opaque,
    )
    add(
        "audit-extract-short-of-checkpoint",
        "Items up to entry 3 with the checkpoint at 4.",
        enc.pack({**full, "items": full["items"][:3]}),
        opaque,
    )
    # An entry may name up to 256 parties (a report's originator and every recipient).
    crowded = AuditEntry(
        seq=1,
        time=NOW,
        event=AuditEvent.RELEASED,
        report=report,
        token=token,
        parties=("tokyo", *(f"party-{i:02}" for i in range(11))),
    )
    crowded_head = chain_next(GENESIS, crowded.content_hash)
    crowded_extract = {
        "start_seq": 0,
        "start_head": GENESIS,
        "items": [{"e": crowded.encode()}],
        "checkpoint": checkpoint(1, head=crowded_head),
    }
    add(
        "audit-extract-entry-with-twelve-parties",
        "A log of one entry naming Tokyo and 11 other parties.",
        enc.pack(crowded_extract),
        expect_ok(entries=[1], checkpoint_seq=1, checkpoint_head=crowded_head),
    )
    return {
        "description": "Audit extracts (docs/protocol.md section 12.3). Verify 'extract' with "
        "tisa.audit.verify_extract as 'member', under the arrangement given, from the point "
        "'known' (seq, chain head). 'ok' gives the seqs of the member's entries and the "
        "checkpoint to keep.",
        "vectors": vectors,
    }


def _verify_extract(vector: Mapping[str, Any]) -> Any:
    known = (vector["known"]["seq"], bytes.fromhex(vector["known"]["head"]))
    return verify_extract(
        bytes.fromhex(vector["extract"]),
        ARRANGEMENTS[vector["arrangement"]],
        vector["member"],
        known=known,
    )


# --- shared by the script and tests/test_vectors.py --------------------------------------


def _flip(data: bytes, position: int, mask: int = 1) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


def malleate(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:], "little")
    return signature[:32] + (s + ED25519_L).to_bytes(32, "little")


def resign(
    envelope: bytes, secret: MemberSecret, *, context: Context = Context.TOKEN, **changes: Any
) -> bytes:
    body = enc.unpack(enc.unpack(envelope)["body"])
    body.update(changes)
    body_bytes = enc.pack(body)
    return enc.pack({"body": body_bytes, "sig": secret.sign(context, body_bytes)})


def _sign_body(body_bytes: bytes) -> bytes:
    return enc.pack({"body": body_bytes, "sig": SECRETS["seoul"].sign(Context.TOKEN, body_bytes)})


def _map_in_order(value: Mapping[str, Any], keys: Iterable[str]) -> bytes:
    keys = list(keys)
    out = bytearray(
        [0x80 | len(keys)] if len(keys) < 16 else b"\xde" + len(keys).to_bytes(2, "big")
    )
    for key in keys:
        out += msgpack.packb(key) + msgpack.packb(value[key], use_bin_type=True)
    return bytes(out)


def _report_ciphertext(vector: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]]) -> bytes:
    if "ciphertext" in vector:
        return bytes.fromhex(vector["ciphertext"])
    base = bytes.fromhex(by_id[vector["base"]]["ciphertext"])
    return mutate(base, vector["mutation"]) if "mutation" in vector else base


def _open(params: Mapping[str, Any], ciphertext: bytes) -> Any:
    opener = ReportOpener(
        content_key=bytes.fromhex(params["content_key"]),
        report_id=bytes.fromhex(params["report_id"]),
        digest=bytes.fromhex(params["digest"]),
        size=params["size"],
        arrangement=ARRANGEMENTS[params["arrangement"]],
        recipient=params["as"],
        originator=params["originator"],
        scope=params["scope"],
        level=params["level"],
    )
    return open_report(ciphertext, opener)


def _check_token(token: bytes, check: Mapping[str, Any]) -> Any:
    arrangement = ARRANGEMENTS[check["arrangement"]]
    if check["check"] == "relay":
        return check_for_relay(
            token,
            arrangement,
            report_id=bytes.fromhex(check["report_id"]),
            digest=bytes.fromhex(check["digest"]),
            size=check["size"],
            originator=check["originator"],
            now=check["now"],
            clock_skew=check["clock_skew"],
        )
    name = check["as"]
    return check_for_recipient(
        token,
        arrangement,
        SECRETS[name],
        name,
        now=check["now"],
        clock_skew=check["clock_skew"],
        prekey_secret=_prekey_lookup(name, check),
    )


def _prekey_lookup(name: str, check: Mapping[str, Any]) -> Callable[[PrekeyKind, bytes], bytes]:
    """The recipient's prekey secrets as a check states them: all of its prekeys in the
    file unless ``held`` lists the public keys it still holds; ``used`` lists one-time
    prekeys it used and deleted (naming one again is a replay)."""
    prekeys = {p.public: p for p in TOKYO_PREKEYS.values()} if name == "tokyo" else {}
    held = check.get("held")
    used = {bytes.fromhex(key) for key in check.get("used", [])}

    def lookup(kind: PrekeyKind, public: bytes) -> bytes:
        if public in used:
            raise Refused(Reason.REPLAYED, "one-time prekey used before")
        secret = prekeys.get(public)
        if (
            secret is None
            or secret.kind is not kind
            or (held is not None and public.hex() not in held)
        ):
            raise Refused(Reason.UNKNOWN_PREKEY, "prekey not held")
        return secret.secret

    return lookup


def _tokyos_token(
    report: Mapping[str, Any],
    token_id: bytes,
    label: str,
    one_time: bytes | None,
    request: bytes | None = None,
) -> bytes:
    """Seoul's token for ``report`` to Tokyo, wrapped to Tokyo's signed prekey and
    ``one_time``, with the ephemeral key derived from ``label`` (approving the release
    request ``request`` if given)."""
    return issue_token(
        SECRETS["seoul"],
        "seoul",
        V1,
        recipient="tokyo",
        report_id=report["report_id"],
        digest=digest(Hash.CIPHERTEXT, report["ciphertext"]),
        size=len(report["ciphertext"]),
        content_key=report["content_key"],
        scope="missile",
        level="secret",
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
        counter=1,
        signed_prekey=PREKEY_ENCODED["signed"],
        one_time_prekey=one_time,
        request=request,
        token_id=token_id,
        _ephemeral=derive(f"token-ephemeral/{label}"),
    )


def _check_prekey(vector: Mapping[str, Any]) -> Any:
    check = vector["check"]
    return Prekey.verify(
        bytes.fromhex(vector["encoded"]),
        ARRANGEMENTS[check["arrangement"]],
        owner=check["owner"],
        kind=PrekeyKind(check["kind"]),
        now=check["now"],
    )


SIGNED_VERIFIERS: dict[str, Callable[[bytes, Arrangement], Any]] = {
    "receipt": Receipt.verify,
    "ack": StoredAck.verify,
    "checkpoint": Checkpoint.verify,
    "announcement": Announcement.verify,
    "request": Request.verify,
    "answer": Answer.verify,
}


def _verify_signed(vector: Mapping[str, Any]) -> Any:
    return SIGNED_VERIFIERS[vector["kind"]](
        bytes.fromhex(vector["encoded"]), ARRANGEMENTS[vector["arrangement"]]
    )


def _require(
    vector: Mapping[str, Any],
    verdict: tuple[str, str | None],
    expected: Mapping[str, Any] | None = None,
) -> None:
    expected = vector["expect"] if expected is None else expected
    want = ("ok", None) if expected["result"] == "ok" else (expected["error"], expected["reason"])
    if verdict != want:
        raise SystemExit(f"{vector['id']}: expected {want}, got {verdict}")


# --- files -------------------------------------------------------------------------------


def build(previous: Mapping[str, Any] | None = None, *, fresh: bool = False) -> dict[str, str]:
    """Every vector file's text, keyed by file name.

    Args:
        previous: the current files, parsed, keyed by name: their random bytes are
            reused where they still check.
        fresh: ignore ``previous``.
    """
    builder = Builder(previous or {}, fresh)
    documents = {
        "arrangement.json": builder.arrangement_file(),
        "report.json": builder.report_file(),
        "token.json": builder.token_file(),
        "receipt.json": builder.receipt_file(),
        "encoding.json": encoding_file(),
        "audit.json": audit_file(),
        "consent.json": builder.consent_file(),
        "prekey.json": builder.prekey_file(),
        "message.json": message_file(),
    }
    return {
        name: json.dumps({"generator": "scripts/make_vectors.py", "now": NOW, **document}, indent=1)
        + "\n"
        for name, document in documents.items()
    }


def load(directory: Path = OUT) -> dict[str, Any]:
    """The vector files in ``directory``, parsed, keyed by name (missing ones left out)."""
    return {
        name: json.loads((directory / name).read_text())
        for name in FILES
        if (directory / name).exists()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files would change")
    parser.add_argument("--fresh", action="store_true", help="draw new libsodium randomness")
    parser.add_argument("--out", type=Path, default=OUT, help="directory of the vector files")
    args = parser.parse_args(argv)
    texts = build(load(args.out), fresh=args.fresh)
    if args.check:
        stale = [
            name
            for name, text in texts.items()
            if not (args.out / name).exists() or (args.out / name).read_text() != text
        ]
        for name in stale:
            print(f"out of date: {args.out / name} (run make vectors)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        path = args.out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
