"""The JSON vectors in tests/vectors: every verdict, and that they are up to date.

The checks here read the files on their own terms (hex, names, parameters) and call the
public API, as another implementation would; only the up-to-date check imports the
generator, ``scripts/make_vectors.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import nacl.bindings as sodium
import pytest

from tisa import encoding as enc
from tisa.arrangement import Arrangement, SignedArrangement
from tisa.audit import Checkpoint, verify_extract
from tisa.consent import Announcement, Answer, Request
from tisa.errors import (
    ArrangementNotEffective,
    ProtocolError,
    Reason,
    Refused,
    TisaError,
    VerificationError,
)
from tisa.keys import Context, Hash, MemberSecret, digest, verify
from tisa.messages import decode_message, encode_message
from tisa.prekeys import Prekey, PrekeyKind
from tisa.receipt import Receipt, StoredAck
from tisa.report import OpenedReport, ReportOpener, ciphertext_size, key_commitment, open_report
from tisa.token import Release, ReleaseToken, check_for_recipient, check_for_relay

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
SCRIPT = ROOT / "scripts" / "make_vectors.py"
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
ERRORS: dict[str, type[TisaError]] = {
    cls.__name__: cls
    for cls in (ProtocolError, VerificationError, Refused, ArrangementNotEffective)
}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


ARRANGEMENT_FILE = load("arrangement.json")
REPORT_FILE = load("report.json")
TOKEN_FILE = load("token.json")
RECEIPT_FILE = load("receipt.json")
CONSENT_FILE = load("consent.json")
ENCODING_FILE = load("encoding.json")
AUDIT_FILE = load("audit.json")
PREKEY_FILE = load("prekey.json")
MESSAGE_FILE = load("message.json")

SECRETS = {
    name: MemberSecret(
        sign_seed=bytes.fromhex(member["sign_seed"]), box_secret=bytes.fromhex(member["box_secret"])
    )
    for name, member in ARRANGEMENT_FILE["members"].items()
}
ARRANGEMENTS = {
    label: Arrangement.decode(bytes.fromhex(version["encoded"]))
    for label, version in ARRANGEMENT_FILE["arrangements"].items()
}
REPORTS = {vector["id"]: vector for vector in REPORT_FILE["vectors"]}


def by_id(document: Mapping[str, Any]) -> Any:
    vectors = document["vectors"]
    return pytest.mark.parametrize("vector", vectors, ids=[v["id"] for v in vectors])


def check_verdict(expect: Mapping[str, Any], call: Callable[[], Any]) -> Any:
    """Run ``call`` and hold it to ``expect``; returns its result when it succeeds."""
    if expect["result"] == "ok":
        return call()
    cls = ERRORS[expect["error"]]
    with pytest.raises(TisaError) as info:
        call()
    assert type(info.value) is cls, f"raised {type(info.value).__name__}: {info.value}"
    if expect["reason"] is not None:
        assert isinstance(info.value, Refused)
        assert info.value.reason.value == expect["reason"]
    else:
        assert not isinstance(info.value, Refused) or isinstance(
            info.value, ArrangementNotEffective
        )
    if isinstance(info.value, VerificationError):
        assert str(info.value) == VerificationError.MESSAGE
    return None


def test_every_file_has_vectors() -> None:
    for name in FILES:
        document = load(name)
        assert document["generator"] == "scripts/make_vectors.py"
        ids = [v["id"] for v in document["vectors"]]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
        assert (
            any(v.get("expect", {}).get("result") == "error" for v in document["vectors"])
            or (name in ("token.json", "prekey.json"))
            or any(v.get("expect", {}).get("result") == "error" for v in document["vectors"])
        )


# The format of the files, as docs/protocol.md Appendix C documents it.
TOP_LEVEL = {"generator", "now", "description", "vectors"}
FILE_KEYS = {
    "arrangement.json": (TOP_LEVEL | {"members", "arrangements"}, {"signed"}),
    "report.json": (
        TOP_LEVEL | {"chunk_size"},
        {"open", "ciphertext", "base", "mutation", "inputs", "generated"},
    ),
    "token.json": (TOP_LEVEL | {"prekeys"}, {"token", "checks", "inputs", "body", "generated"}),
    "receipt.json": (TOP_LEVEL, {"kind", "arrangement", "encoded"}),
    "encoding.json": (TOP_LEVEL, {"encoded"}),
    "audit.json": (TOP_LEVEL, {"arrangement", "member", "known", "extract"}),
    "consent.json": (TOP_LEVEL, {"kind", "arrangement", "encoded"}),
    "prekey.json": (TOP_LEVEL, {"encoded", "check"}),
    "message.json": (TOP_LEVEL, {"encoded"}),
}
PREFIXES = ("arrangement-", "report-", "token-", "receipt-", "ack-", "checkpoint-")
PREFIXES += ("encoding-", "audit-", "announcement-", "request-", "answer-", "prekey-")
PREFIXES += ("message-",)
MUTATIONS = {"flip", "truncate", "append", "drop"}


def _verdicts(vector: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c["expect"] for c in vector["checks"]] if "checks" in vector else [vector["expect"]]


def test_files_follow_the_documented_format() -> None:
    seen: set[str] = set()
    for name in FILES:
        document = load(name)
        top, own = FILE_KEYS[name]
        assert set(document) == top, name
        for vector in document["vectors"]:
            assert vector["id"] not in seen and vector["id"].startswith(PREFIXES)
            seen.add(vector["id"])
            assert set(vector) - {"id", "description", "expect", "checks"} <= own, vector["id"]
            assert ("checks" in vector) != ("expect" in vector)
            if "mutation" in vector:
                assert len(vector["mutation"]) == 1 and set(vector["mutation"]) <= MUTATIONS
                assert vector["base"] in REPORTS
            for expect in _verdicts(vector):
                assert expect["result"] in ("ok", "error")
                if expect["result"] == "ok":
                    continue
                error, reason = expect["error"], expect["reason"]
                assert error in ERRORS
                if error == "Refused":
                    assert reason in {r.value for r in Reason}
                elif error == "ArrangementNotEffective":
                    assert reason == "arrangement_not_effective" and expect["missing"]
                else:
                    assert reason is None


def test_required_vector_ids_are_present() -> None:
    ids = {v["id"] for name in FILES for v in load(name)["vectors"]}
    required = {
        "token-tampered-field-recipient",
        "token-wrong-context",
        "token-expired",
        "token-wrong-recipient",
        "token-noncanonical-map-order",
        "token-malleated-signature",
        "report-truncated",
        "report-flipped-chunk-tag",
        "receipt-wrong-signer",
        "arrangement-missing-signature",
        "token-approves-request",
        "token-request-nil",
        "token-request-added-not-rewrapped",
        "request-valid",
        "request-wrong-context",
        "answer-not-a-denial-code",
        "announcement-valid",
        # Issue 12: what an implementer once had to guess.
        "arrangement-order-non-member-before-bad-signature",
        "arrangement-order-bad-signature-before-missing",
        "arrangement-invalid-relay-also-recipient",
        "arrangement-name-with-unicode-line-breaks",
        "token-recipient-name-with-line-separator",
        "token-recipient-name-with-unit-separator",
        "report-header-version-mismatch",
        "report-recipient-is-relay",
        "report-recipient-is-originator",
        "receipt-originator-relay",
        "ack-originator-not-a-member",
        "encoding-depth-8-lists",
        "encoding-depth-9-lists",
        "encoding-keys-out-of-order-nested",
        "audit-extract-entry-malformed",
        "audit-extract-checkpoint-other-arrangement",
    }
    assert required <= ids, required - ids
    # A tampered-field vector for every field of a token.
    token_fields = enc.unpack(bytes.fromhex(TOKEN_FILE["vectors"][0]["body"]))
    for field in token_fields:
        assert f"token-tampered-field-{field.replace('_', '-')}" in ids


# --- members and arrangements ------------------------------------------------------------


def test_members_derive_from_their_seeds() -> None:
    for name, member in ARRANGEMENT_FILE["members"].items():
        public = SECRETS[name].public
        assert public.signing.raw.hex() == member["sign_public"]
        assert public.encryption.raw.hex() == member["box_public"]
        assert public.fingerprint == member["fingerprint"]


def test_arrangement_encodings() -> None:
    for label, version in ARRANGEMENT_FILE["arrangements"].items():
        arrangement = ARRANGEMENTS[label]
        assert arrangement.encoded.hex() == version["encoded"]
        assert arrangement.id.hex() == version["id"]
        assert arrangement.id == digest(Hash.ARRANGEMENT, arrangement.encoded)
        assert arrangement.version == version["version"]
        for name, signature in version["signatures"].items():
            verify(
                SECRETS[name].public.signing,
                Context.ARRANGEMENT,
                arrangement.id,
                bytes.fromhex(signature),
            )
            # Ed25519 is deterministic: the signature is reproduced exactly.
            assert arrangement.sign(SECRETS[name], name).hex() == signature
    assert ARRANGEMENTS["v2"].previous == ARRANGEMENTS["v1"].id


@by_id(ARRANGEMENT_FILE)
def test_arrangement_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["signed"])
    result = check_verdict(vector["expect"], lambda: SignedArrangement.load_effective(data))
    if result is not None:
        assert result.id.hex() == vector["expect"]["id"]
    if "missing" in vector["expect"]:
        with pytest.raises(ArrangementNotEffective) as info:
            SignedArrangement.load_effective(data)
        assert info.value.missing == vector["expect"]["missing"]


# --- reports -----------------------------------------------------------------------------


def mutate(data: bytes, mutation: Mapping[str, Any]) -> bytes:
    ((kind, arg),) = mutation.items()
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
    raise AssertionError(f"unknown mutation {kind}")


def report_ciphertext(vector: Mapping[str, Any]) -> bytes:
    if "base" not in vector:
        return bytes.fromhex(vector["ciphertext"])
    base = bytes.fromhex(REPORTS[vector["base"]]["ciphertext"])
    derived = mutate(base, vector["mutation"]) if "mutation" in vector else base
    if "ciphertext" in vector:
        assert bytes.fromhex(vector["ciphertext"]) == derived
    return derived


def open_with(params: Mapping[str, Any], ciphertext: bytes) -> OpenedReport:
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


def decrypt(ciphertext: bytes, key: bytes, report_id: bytes, chunk: int) -> bytes:
    """Decrypt as the format specifies, independently of ReportOpener."""
    header_size = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
    wire = chunk + sodium.crypto_secretstream_xchacha20poly1305_ABYTES
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, ciphertext[:header_size], key)
    plain = []
    starts = list(range(header_size, len(ciphertext), wire))
    for start in starts:
        piece, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
            state, ciphertext[start : start + wire], report_id
        )
        final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
        assert (tag == final) == (start == starts[-1])
        plain.append(bytes(piece))
    return b"".join(plain)


def report_body(inputs: Mapping[str, Any]) -> bytes:
    if "body" in inputs:
        return bytes.fromhex(inputs["body"])
    pattern = inputs["body_pattern"]
    assert pattern["byte_i"] == "i mod 251"
    return bytes(i % 251 for i in range(pattern["length"]))


@by_id(REPORT_FILE)
def test_report_vector(vector: dict[str, Any]) -> None:
    ciphertext = report_ciphertext(vector)
    opened = check_verdict(vector["expect"], lambda: open_with(vector["open"], ciphertext))
    if opened is None:
        return
    inputs, expect, params = vector["inputs"], vector["expect"], vector["open"]
    header = enc.pack(opened.header.to_dict())
    assert header.hex() == expect["header"]
    assert opened.body == report_body(inputs)
    assert opened.attachments == {
        a["name"]: bytes.fromhex(a["data"]) for a in inputs["attachments"]
    }
    assert opened.header.id.hex() == inputs["report_id"] == params["report_id"]
    assert opened.header.arrangement == ARRANGEMENTS[inputs["arrangement"]].id
    assert list(opened.header.recipients) == sorted(inputs["recipients"], key=str.encode)
    assert (opened.header.scope, opened.header.level) == (inputs["scope"], inputs["level"])
    assert opened.header.created == inputs["created"]
    assert len(ciphertext) == expect["ciphertext_size"] == params["size"]
    assert ciphertext_size(expect["padded_size"]) == len(ciphertext)
    assert digest(Hash.CIPHERTEXT, ciphertext).hex() == params["digest"]
    # The plaintext, decrypted independently, has the documented layout:
    # u32 header length | header | signature | body | attachments | zeros.
    plaintext = decrypt(
        ciphertext,
        bytes.fromhex(inputs["content_key"]),
        bytes.fromhex(inputs["report_id"]),
        REPORT_FILE["chunk_size"],
    )
    assert hashlib.sha256(plaintext).hexdigest() == expect["plaintext_sha256"]
    if "plaintext" in expect:
        assert plaintext.hex() == expect["plaintext"]
    assert len(plaintext) == expect["padded_size"]
    (length,) = struct.unpack(">I", plaintext[:4])
    assert plaintext[4 : 4 + length] == header
    signature = plaintext[4 + length : 4 + length + 64]
    assert signature.hex() == expect["signature"]
    verify(SECRETS[inputs["originator"]].public.signing, Context.REPORT, header, signature)
    content = opened.body + b"".join(opened.attachments[n] for n, _ in opened.header.attachments)
    rest = plaintext[4 + length + 64 :]
    assert rest[: len(content)] == content
    assert not any(rest[len(content) :])


# --- tokens ------------------------------------------------------------------------------


def run_check(token: bytes, check: Mapping[str, Any]) -> ReleaseToken | Release:
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
    assert check["check"] == "recipient"
    name = check["as"]
    return check_for_recipient(
        token,
        arrangement,
        SECRETS[name],
        name,
        now=check["now"],
        clock_skew=check["clock_skew"],
        prekey_secret=prekey_lookup(name, check),
    )


def prekey_lookup(name: str, check: Mapping[str, Any]) -> Callable[[PrekeyKind, bytes], bytes]:
    """The recipient's prekey secrets as the file and the check state them."""
    held_all = TOKEN_FILE["prekeys"].get(name, {}).values()
    held = {p["public"]: p for p in held_all if p["public"] in check.get("held", [p["public"]])}
    used = set(check.get("used", []))

    def lookup(kind: PrekeyKind, public: bytes) -> bytes:
        if public.hex() in used:
            raise Refused(Reason.REPLAYED, "used before")
        prekey = held.get(public.hex())
        if prekey is None or prekey["kind"] != kind.value:
            raise Refused(Reason.UNKNOWN_PREKEY, "not held")
        return bytes.fromhex(prekey["secret"])

    return lookup


@by_id(TOKEN_FILE)
def test_token_vector(vector: dict[str, Any]) -> None:
    token = bytes.fromhex(vector["token"])
    assert vector["checks"]
    for check in vector["checks"]:
        result = check_verdict(check["expect"], lambda c=check: run_check(token, c))  # type: ignore[misc]
        if isinstance(result, Release):
            assert result.token.id.hex() == check["expect"]["token_id"]
            assert result.content_key.hex() == check["expect"]["content_key"]
        elif isinstance(result, ReleaseToken):
            assert result.id.hex() == check["expect"]["token_id"]


def test_valid_token_matches_its_inputs() -> None:
    vector = next(v for v in TOKEN_FILE["vectors"] if v["id"] == "token-valid")
    inputs = vector["inputs"]
    token = ReleaseToken.decode(bytes.fromhex(vector["token"]))
    report = REPORTS[inputs["report"]]
    assert token.body.hex() == vector["body"]
    assert token.id.hex() == inputs["token_id"]
    assert token.arrangement == ARRANGEMENTS[inputs["arrangement"]].id
    assert (token.originator, token.recipient, token.relay) == (
        inputs["originator"],
        inputs["recipient"],
        ARRANGEMENTS[inputs["arrangement"]].relay,
    )
    assert token.report.hex() == report["open"]["report_id"]
    assert token.digest.hex() == report["open"]["digest"]
    assert token.size == report["open"]["size"]
    assert (token.not_before, token.not_after, token.counter) == (
        inputs["not_before"],
        inputs["not_after"],
        inputs["counter"],
    )
    assert (token.scope, token.level) == (inputs["scope"], inputs["level"])
    content_key = bytes.fromhex(inputs["content_key"])
    assert token.key_commit == key_commitment(content_key, token.report)
    assert token.key_commit.hex() == inputs["key_commit"]
    # The key wrap, from the inputs alone (docs/protocol.md section 10.2).
    prekeys = TOKEN_FILE["prekeys"][inputs["recipient"]]
    signed = bytes.fromhex(prekeys[inputs["signed_prekey"]]["public"])
    one_time = bytes.fromhex(prekeys[inputs["one_time_prekey"]]["public"])
    ephemeral = bytes.fromhex(inputs["ephemeral_secret"])
    identity = SECRETS[inputs["recipient"]].public.encryption.raw
    eph = sodium.crypto_scalarmult_base(ephemeral)
    assert token.wrap.eph == eph and (token.wrap.spk, token.wrap.opk) == (signed, one_time)
    shared = b"".join(sodium.crypto_scalarmult(ephemeral, k) for k in (identity, signed, one_time))
    wrap_key = hashlib.blake2b(
        shared + b"one_time\n" + eph + identity + signed + one_time,
        digest_size=32,
        person=b"tisa1-prekeywrap",
    ).digest()
    body = enc.unpack(token.body)
    del body["wrap"]
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        content_key, enc.pack(body), bytes(24), wrap_key
    )
    assert token.wrap.sealed == sealed
    # Every byte follows from the inputs: the signature is reproduced exactly.
    assert SECRETS[inputs["originator"]].sign(Context.TOKEN, token.body) == token.signature
    # And the token opens its report.
    release = check_for_recipient(
        token.encoded,
        ARRANGEMENTS["v1"],
        SECRETS["tokyo"],
        "tokyo",
        now=vector["checks"][0]["now"],
        prekey_secret=prekey_lookup("tokyo", {}),
    )
    opened = open_report(bytes.fromhex(report["ciphertext"]), release.opener(ARRANGEMENTS["v1"]))
    assert opened.body.hex() == report["inputs"]["body"]


# --- prekeys -----------------------------------------------------------------------------


@by_id(PREKEY_FILE)
def test_prekey_vector(vector: dict[str, Any]) -> None:
    check = vector["check"]

    def run() -> Prekey:
        return Prekey.verify(
            bytes.fromhex(vector["encoded"]),
            ARRANGEMENTS[check["arrangement"]],
            owner=check["owner"],
            kind=PrekeyKind(check["kind"]),
            now=check["now"],
        )

    result = check_verdict(vector["expect"], run)
    if result is not None:
        assert result.key.hex() == vector["expect"]["key"]


def test_published_prekeys_match_their_secrets() -> None:
    for owner, prekeys in TOKEN_FILE["prekeys"].items():
        for prekey in prekeys.values():
            public = sodium.crypto_scalarmult_base(bytes.fromhex(prekey["secret"]))
            assert public.hex() == prekey["public"]
            decoded = Prekey.decode(bytes.fromhex(prekey["encoded"]))
            assert (decoded.owner, decoded.kind.value, decoded.key) == (
                owner,
                prekey["kind"],
                public,
            )


# --- receipts, acks, checkpoints ---------------------------------------------------------

VERIFIERS: dict[str, Callable[[bytes, Arrangement], Any]] = {
    "receipt": Receipt.verify,
    "ack": StoredAck.verify,
    "checkpoint": Checkpoint.verify,
    "announcement": Announcement.verify,
    "request": Request.verify,
    "answer": Answer.verify,
}


@by_id({"vectors": RECEIPT_FILE["vectors"] + CONSENT_FILE["vectors"]})
def test_signed_object_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["encoded"])
    arrangement = ARRANGEMENTS[vector["arrangement"]]
    result = check_verdict(vector["expect"], lambda: VERIFIERS[vector["kind"]](data, arrangement))
    if result is None:
        return
    for field, value in vector["expect"].items():
        if field == "result":
            continue
        actual = getattr(result, field)
        if isinstance(actual, tuple):
            actual = list(actual)
        assert (actual.hex() if isinstance(actual, bytes) else actual) == value, field


# --- canonical encoding, audit extracts --------------------------------------------------


@by_id(ENCODING_FILE)
def test_encoding_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["encoded"])
    decoded = check_verdict(vector["expect"], lambda: enc.unpack(data))
    if decoded is not None:
        # What decodes is canonical: it encodes back to exactly the same bytes.
        assert enc.pack(decoded) == data


@by_id(MESSAGE_FILE)
def test_message_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["encoded"])
    decoded = check_verdict(vector["expect"], lambda: decode_message(data))
    if decoded is not None:
        assert vector["expect"]["type"] == decoded.TYPE
        assert encode_message(decoded) == data


@by_id(AUDIT_FILE)
def test_audit_extract_vector(vector: dict[str, Any]) -> None:
    known = (vector["known"]["seq"], bytes.fromhex(vector["known"]["head"]))
    result = check_verdict(
        vector["expect"],
        lambda: verify_extract(
            bytes.fromhex(vector["extract"]),
            ARRANGEMENTS[vector["arrangement"]],
            vector["member"],
            known=known,
        ),
    )
    if result is None:
        return
    entries, checkpoint = result
    expect = vector["expect"]
    assert [e.seq for e in entries] == expect["entries"]
    assert all(vector["member"] in e.parties for e in entries)
    assert (checkpoint.seq, checkpoint.head.hex()) == (
        expect["checkpoint_seq"],
        expect["checkpoint_head"],
    )


# --- up to date --------------------------------------------------------------------------


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_reproduces_the_files() -> None:
    # With the random bytes of the current files (sealed boxes, stream headers), the
    # generator must give back exactly the same files: otherwise the protocol changed
    # and the vectors must be regenerated (make vectors) and reviewed.
    module = generator()
    texts = module.build(module.load(VECTORS))
    for name in FILES:
        assert texts[name] == (VECTORS / name).read_text(), f"{name} is stale: run make vectors"


def test_fresh_randomness_changes_only_the_generated_parts() -> None:
    module = generator()
    fresh = {name: json.loads(text) for name, text in module.build(fresh=True).items()}
    assert fresh["arrangement.json"] == ARRANGEMENT_FILE
    for vector, current in zip(
        fresh["report.json"]["vectors"], REPORT_FILE["vectors"], strict=True
    ):
        assert vector["id"] == current["id"]
        if "inputs" in current:
            assert vector["inputs"] == current["inputs"]
            assert vector["expect"] == current["expect"]
            assert vector["ciphertext"] != current["ciphertext"]
    fresh_token = fresh["token.json"]["vectors"][0]
    current_token = TOKEN_FILE["vectors"][0]
    assert fresh_token["inputs"] == current_token["inputs"]
    # The token itself draws no randomness (the wrap's ephemeral is an input); it
    # differs only through the digest of the report's fresh ciphertext.
    assert fresh_token["token"] != current_token["token"]
    assert fresh["token.json"]["prekeys"] == TOKEN_FILE["prekeys"]
    assert fresh["prekey.json"] == PREKEY_FILE
