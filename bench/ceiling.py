"""The libsodium work per report: the bare forwarder's against the least the relay must do.

``python -m bench nodes`` compares the relay's throughput with a bare trio forwarder that,
per message, makes one Ed25519 check and forwards. This measures, in the same run, how
much libsodium work each of the two does per 1 KiB report, calling the same
``nacl.bindings`` functions on messages of the sizes the real code path produces (the
token, acknowledgement, receipt, frames and audit entries are made by the toolkit once,
before timing; only the libsodium calls are timed):

* bare: one ``crypto_sign_open`` of a 64 + 300-byte signed message, exactly what
  ``bench.nodes._forwarder`` does per message;
* relay, the least it must do per report:

  - one Ed25519 verification of the release token (``check_for_relay``; like every
    verification in :func:`tisa.keys.verify`, ``crypto_sign_open`` of signature ||
    ``b"tisa/1/token\\n"`` || token body);
  - one Ed25519 signature of the stored-acknowledgement it answers a submission with
    (:meth:`tisa.receipt.StoredAck.issue`, ``crypto_sign`` as :meth:`MemberSecret.sign`);
  - one Ed25519 verification of the recipient's receipt (``Relay._receipt`` calls
    :meth:`tisa.receipt.Receipt.verify`); timed apart as well, since one could argue
    the relay need not check receipts;
  - one BLAKE2b-256 of the ciphertext, personalised ``Hash.CIPHERTEXT``, to check the
    declared digest (``BlobWriter``/``InlineBlob.digest`` in :mod:`relay.store`; the relay
    hashes chunk by chunk with init/update/final, timed here as one call, which is less);
  - one BLAKE2b-256 per audit entry a report writes (:data:`AUDIT_ENTRIES_PER_REPORT`,
    ``Store._audit``, the entry's encoding personalised ``Hash.AUDIT``; the relay also
    hashes each entry into the chain, ``chain_next``, a second BLAKE2b not counted here);
  - one secretstream push or pull per frame it sends or receives for the report
    (:data:`FRAMES_PER_REPORT`), each of the size ``tisa.messages.encode_message`` gives.

Nothing else is counted: no Python, no trio, no msgpack, no SQLite, no fsync, no second
hash per audit entry; so the relay figure is a floor: a relay meeting these requirements
spends at least this long per report on one core. One caveat: each call goes through
PyNaCl's Python wrapper, a few µs per call whatever the size (most of what a short
BLAKE2b costs here); the bare figure pays it once, the relay's once per call. So the
three Ed25519 calls alone (token check, ack signature, receipt check; everything else
taken as free) are also shown, as a ceiling no lighter hashing or channel could lift.

Figures: bare µs/message, relay µs/report (with and without the receipt check), and
their ratio bare/relay, the throughput ratio a relay would reach on one core if it and
the bare forwarder both did nothing but their libsodium work. That is not yet a bound on
the ratio ``nodes`` measures, whose bare forwarder also spends Python and trio time per
message; so ``python -m bench nodes`` also divides the most reports a second a relay
doing only its libsodium work could handle (1e6 / relay µs) by the bare forwarder's
measured rate, which does bound the measured ratio.

Rounds alternate (bare, relay, relay without the receipt check, each part) and the best
round of each is kept, so a noisy neighbour slows all alike.

    python -m bench ceiling [--rounds 7] [--iterations 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import nacl.bindings as sodium

from bench.world import LEVEL, SCOPE, bench_arrangement, bench_prekey
from tisa.audit import AuditEntry, AuditEvent
from tisa.envelope import open_envelope
from tisa.keys import SIGN_PREFIX, Context, Hash, MemberSecret
from tisa.messages import (
    MAX_CHUNK_DATA,
    Ack,
    Chunk,
    DeliverInline,
    Message,
    ReceiptNotice,
    SendReceipt,
    Stored,
    SubmitInline,
    encode_message,
)
from tisa.receipt import MAX_RECEIPT_SIZE, Receipt, StoredAck
from tisa.report import seal_report
from tisa.token import ReleaseToken, issue_token

__all__ = [
    "TARGET",
    "Fixture",
    "bound_against",
    "bound_line",
    "make_fixture",
    "measure",
    "per_call_us",
    "relay_calls",
    "report",
    "summary_line",
    "main",
]

# The issue's throughput target: tisa at least this fraction of the bare forwarder.
TARGET = 0.8

REPORT_BODY = 1024
NOW = 1_700_000_000
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE

# The frames the relay opens ("pull") or seals ("push") for one report delivered to one
# recipient, in the order relay/server.py handles them (read from the code; update this
# list if the session protocol changes):
#   _submit_inline: submit_inline (the report and its token) from the originator; stored
#     (with the signed ack, naming the token released) to it;
#   _deliver (the pusher): deliver_inline (the token and the ciphertext) to the recipient;
#   _receipt: send_receipt from the recipient (protocol version 4: it also acks the
#     delivery, which version 3 did with an ack of kind "delivery"); ack (kind
#     "receipt") to it;
#   _push_loop: receipt (the notice) to the originator;
#   _ack: ack (kind "receipt") from the originator.
FRAMES_PER_REPORT: tuple[tuple[str, str, str], ...] = (
    # Protocol version 3: a small report and its token in one message each way; 4: the
    # recipient's receipt is its delivery's ack.
    ("pull", "originator", "submit_inline"),
    ("push", "originator", "stored"),
    ("push", "recipient", "deliver_inline"),
    ("pull", "recipient", "send_receipt"),
    ("push", "recipient", "ack"),
    ("push", "originator", "receipt"),
    ("pull", "originator", "ack"),
)

# Audit entries one report delivered to one recipient writes (relay/store.py):
# add_report (stored), release (released), mark_forwarded or ack_delivery (forwarded,
# exactly once), ack_delivery (acknowledged), add_receipt (receipt). ack_receipt writes none.
AUDIT_ENTRIES_PER_REPORT: tuple[AuditEvent, ...] = (
    AuditEvent.STORED,
    AuditEvent.RELEASED,
    AuditEvent.FORWARDED,
    AuditEvent.ACKNOWLEDGED,
    AuditEvent.RECEIPT,
)


def _seed(label: str) -> bytes:
    return bytes(sodium.crypto_generichash_blake2b_salt_personal(label.encode(), digest_size=32))


def _signed(context: Context, body: bytes) -> bytes:
    """The bytes Ed25519 signs for ``body`` in ``context`` (as tisa.keys does)."""
    return SIGN_PREFIX + context.value + b"\n" + body


@dataclasses.dataclass(frozen=True)
class Fixture:
    """The inputs of every timed call, made once by the toolkit itself."""

    bare_signed: bytes  # signature(64) || message(300), as bench.nodes sends it
    bare_public: bytes
    token_signed: bytes  # signature || b"tisa/1/token\n" || token body
    originator_public: bytes
    ack_message: bytes  # b"tisa/1/ack\n" || StoredAck body
    relay_secret: bytes  # Ed25519 secret key (64 bytes)
    receipt_signed: bytes  # signature || b"tisa/1/receipt\n" || receipt body
    recipient_public: bytes
    ciphertext: bytes
    audit_entries: tuple[bytes, ...]
    # (direction, peer, type, plaintext), one per frame, chunks expanded.
    frames: tuple[tuple[str, str, str, bytes], ...]


def make_fixture(
    frames_per_report: tuple[tuple[str, str, str], ...] = FRAMES_PER_REPORT,
) -> Fixture:
    """Seal a 1 KiB report and make its token, ack, receipt, frames and audit entries.

    ``frames_per_report``: the frames to make (default :data:`FRAMES_PER_REPORT`); also
    ``("pull", "recipient", "ack")``, the delivery ack a recipient sends without a
    receipt (the relay-alone run's sink, :mod:`bench.floors`)."""
    seeds = {name: _seed(f"bench-ceiling-{name}") for name in ("seoul", "tokyo", "washington")}
    secrets = {
        name: MemberSecret(sign_seed=seed, box_secret=_seed(f"box-{name}"))
        for name, seed in seeds.items()
    }
    arrangement = bench_arrangement(secrets, created=NOW)
    sealed = seal_report(
        secrets["seoul"], "seoul", arrangement, recipients=["tokyo"], scope=SCOPE,
        level=LEVEL, body=os.urandom(REPORT_BODY), now=NOW,
    )  # fmt: skip
    token_bytes = issue_token(
        secrets["seoul"], "seoul", arrangement, recipient="tokyo", report_id=sealed.report_id,
        digest=sealed.digest, size=sealed.size, content_key=sealed.content_key,
        scope=SCOPE, level=LEVEL, not_before=NOW, not_after=NOW + 3600, counter=1,
        signed_prekey=bench_prekey(secrets["tokyo"], "tokyo", arrangement, now=NOW)[0],
    )  # fmt: skip
    token = ReleaseToken.decode(token_bytes)
    ack = StoredAck.issue(
        secrets["washington"], arrangement, report=sealed.report_id, originator="seoul",
        digest=sealed.digest, size=sealed.size, stored=NOW,
    )  # fmt: skip
    ack_body, _, _ = open_envelope(ack.encoded, max_size=MAX_RECEIPT_SIZE, what="ack")
    receipt = Receipt.issue(
        secrets["tokyo"], arrangement, report=sealed.report_id, token=token.id,
        originator="seoul", recipient="tokyo", digest=sealed.digest, received=NOW,
    )  # fmt: skip
    receipt_body, _, receipt_sig = open_envelope(
        receipt.encoded, max_size=MAX_RECEIPT_SIZE, what="receipt"
    )
    ciphertext = sealed.ciphertext
    pieces = [ciphertext[i : i + MAX_CHUNK_DATA] for i in range(0, len(ciphertext), MAX_CHUNK_DATA)]
    report = sealed.report_id
    one: dict[tuple[str, str, str], Message] = {
        ("pull", "originator", "submit_inline"): SubmitInline(
            report=report,
            digest=sealed.digest,
            expires=NOW + 3600,
            data=sealed.ciphertext,
            tokens=[token_bytes],
        ),
        ("push", "originator", "stored"): Stored(
            report=report, ack=ack.encoded, released=[token.id]
        ),
        ("push", "recipient", "deliver_inline"): DeliverInline(
            token=token_bytes, data=sealed.ciphertext
        ),
        ("pull", "recipient", "ack"): Ack(kind="delivery", token=token.id),
        ("pull", "recipient", "send_receipt"): SendReceipt(receipt=receipt.encoded),
        ("push", "recipient", "ack"): Ack(kind="receipt", token=token.id),
        ("push", "originator", "receipt"): ReceiptNotice(receipt=receipt.encoded),
        ("pull", "originator", "ack"): Ack(kind="receipt", token=token.id),
    }
    frames: list[tuple[str, str, str, bytes]] = []
    for frame in frames_per_report:
        if frame[2] == "chunk":
            frames += [(*frame, encode_message(Chunk(data=piece))) for piece in pieces]
        else:
            frames.append((*frame, encode_message(one[frame])))
    audit = tuple(
        AuditEntry(
            seq=1_000_000 + i,
            time=NOW,
            event=event,
            report=report,
            token=None if event is AuditEvent.STORED else token.id,
            parties=("seoul",) if event is AuditEvent.STORED else ("seoul", "tokyo"),
        ).encode()
        for i, event in enumerate(AUDIT_ENTRIES_PER_REPORT)
    )
    bare_public, bare_secret = sodium.crypto_sign_seed_keypair(b"\x07" * 32)
    _, relay_secret = sodium.crypto_sign_seed_keypair(seeds["washington"])
    fixture = Fixture(
        bare_signed=bytes(sodium.crypto_sign(os.urandom(300), bare_secret)),
        bare_public=bytes(bare_public),
        token_signed=token.signature + _signed(Context.TOKEN, token.body),
        originator_public=secrets["seoul"].public.signing.raw,
        ack_message=_signed(Context.ACK, ack_body),
        relay_secret=bytes(relay_secret),
        receipt_signed=receipt_sig + _signed(Context.RECEIPT, receipt_body),
        recipient_public=secrets["tokyo"].public.signing.raw,
        ciphertext=ciphertext,
        audit_entries=audit,
        frames=tuple(frames),
    )
    # The timed calls must succeed as the relay's do (a failed check costs differently).
    sodium.crypto_sign_open(fixture.token_signed, fixture.originator_public)
    sodium.crypto_sign_open(fixture.receipt_signed, fixture.recipient_public)
    sodium.crypto_sign_open(fixture.bare_signed, fixture.bare_public)
    if (
        bytes(sodium.crypto_sign(fixture.ack_message, fixture.relay_secret)[:64])
        != (open_envelope(ack.encoded, max_size=MAX_RECEIPT_SIZE, what="ack")[2])
    ):
        raise AssertionError("the ack signature differs from StoredAck.issue's")
    return fixture


# --- the timed work ----------------------------------------------------------------------


def _transport(fixture: Fixture, n: int) -> Callable[[], None]:
    """One report's frames through the relay's channels, for ``n`` calls.

    The relay keeps one channel per member: it pushes on its own stream to the member
    and pulls from the member's. What it pulls is sealed here in advance, untimed, for
    ``n`` reports in order.
    """
    push = sodium.crypto_secretstream_xchacha20poly1305_push
    pull = sodium.crypto_secretstream_xchacha20poly1305_pull
    new_state = sodium.crypto_secretstream_xchacha20poly1305_state
    relay_push: dict[str, Any] = {}
    relay_pull: dict[str, Any] = {}
    member_push: dict[str, Any] = {}
    for peer in ("originator", "recipient"):
        relay_push[peer] = new_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_push(relay_push[peer], os.urandom(32))
        key = os.urandom(32)
        member_push[peer], relay_pull[peer] = new_state(), new_state()
        header = sodium.crypto_secretstream_xchacha20poly1305_init_push(member_push[peer], key)
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(relay_pull[peer], header, key)
    plan = tuple(
        (direction == "pull", relay_pull[peer] if direction == "pull" else relay_push[peer], data)
        for direction, peer, _, data in fixture.frames
    )
    incoming = [
        push(member_push[peer], data, None, TAG_MESSAGE)
        for _ in range(n)
        for direction, peer, _, data in fixture.frames
        if direction == "pull"
    ]
    source = iter(incoming)

    def one_report() -> None:
        for is_pull, state, data in plan:
            if is_pull:
                pull(state, next(source))
            else:
                push(state, data, None, TAG_MESSAGE)

    return one_report


def relay_calls(fixture: Fixture, n: int, *, check_receipt: bool) -> Callable[[], object]:
    """The relay's least libsodium work for one report of ``fixture`` (its frames and
    audit entries; the receipt's check if ``check_receipt``), fresh for ``n`` calls."""
    sign_open = sodium.crypto_sign_open
    sign = sodium.crypto_sign
    blake2b = sodium.crypto_generichash_blake2b_salt_personal
    ciphertext_person, audit_person = Hash.CIPHERTEXT.value, Hash.AUDIT.value
    f = fixture
    transport = _transport(f, n)

    def relay() -> object:
        sign_open(f.token_signed, f.originator_public)
        blake2b(f.ciphertext, digest_size=32, person=ciphertext_person)
        sign(f.ack_message, f.relay_secret)
        if check_receipt:
            sign_open(f.receipt_signed, f.recipient_public)
        for entry in f.audit_entries:
            blake2b(entry, digest_size=32, person=audit_person)
        transport()
        return None

    return relay


def _calls(fixture: Fixture, n: int) -> dict[str, Callable[[], object]]:
    """Fresh callables for one round of ``n`` calls each (channels need fresh streams)."""
    sign_open = sodium.crypto_sign_open
    sign = sodium.crypto_sign
    blake2b = sodium.crypto_generichash_blake2b_salt_personal
    ciphertext_person, audit_person = Hash.CIPHERTEXT.value, Hash.AUDIT.value
    f = fixture

    def bare() -> object:
        return sign_open(f.bare_signed, f.bare_public)

    def token_verify() -> object:
        return sign_open(f.token_signed, f.originator_public)

    def ack_sign() -> object:
        return sign(f.ack_message, f.relay_secret)

    def receipt_verify() -> object:
        return sign_open(f.receipt_signed, f.recipient_public)

    def ciphertext_digest() -> object:
        return blake2b(f.ciphertext, digest_size=32, person=ciphertext_person)

    def audit() -> object:
        for entry in f.audit_entries:
            blake2b(entry, digest_size=32, person=audit_person)
        return None

    return {
        "bare": bare,
        "relay": relay_calls(f, n, check_receipt=True),
        "relay_without_receipt_verify": relay_calls(f, n, check_receipt=False),
        "token_verify": token_verify,
        "ack_sign": ack_sign,
        "receipt_verify": receipt_verify,
        "ciphertext_digest": ciphertext_digest,
        "audit_digests": audit,
        "transport": _transport(f, n),
    }


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Thread CPU µs per call of ``fn``, over ``n`` calls."""
    # CPU time of this thread, not wall time: on a shared machine a wall clock counts the
    # time other tenants hold the core, which the relay's CPU seconds do not.
    start = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - start) / n / 1000


def measure(rounds: int = 7, iterations: int = 1000) -> dict[str, Any]:
    """Time the bare and the relay's least libsodium work per report; see the module doc.

    Returns the figures as a JSON-ready dict: ``bare_us``, ``relay_us``,
    ``relay_without_receipt_verify_us``, ``ratio`` (bare/relay),
    ``ratio_without_receipt_verify``, ``parts_us`` (each part of the relay's work alone)
    and what was counted (``frames``, ``audit_entries``, sizes).
    """
    fixture = make_fixture()
    best: dict[str, float] = {}
    for _ in range(rounds):
        calls = _calls(fixture, iterations)  # untimed: seals the frames the relay will open
        for name, fn in calls.items():
            best[name] = min(best.get(name, math.inf), per_call_us(fn, iterations))
    frames = [
        {"direction": d, "peer": p, "type": k, "bytes": len(m) + 17}
        for d, p, k, m in fixture.frames
    ]
    ed25519 = best["token_verify"] + best["ack_sign"]
    return {
        "bare_us": best["bare"],
        "relay_us": best["relay"],
        "relay_without_receipt_verify_us": best["relay_without_receipt_verify"],
        "ratio": best["bare"] / best["relay"],
        "ratio_without_receipt_verify": best["bare"] / best["relay_without_receipt_verify"],
        # The Ed25519 parts alone (sums of parts timed apart): the ceiling even if hashing
        # and the channel cost nothing.
        "ratio_ed25519_only": best["bare"] / (ed25519 + best["receipt_verify"]),
        "ratio_ed25519_only_without_receipt_verify": best["bare"] / ed25519,
        "target": TARGET,
        "parts_us": {
            name: best[name]
            for name in (
                "token_verify",
                "ack_sign",
                "receipt_verify",
                "ciphertext_digest",
                "audit_digests",
                "transport",
            )
        },
        "frames": frames,
        "audit_entries": [event.value for event in AUDIT_ENTRIES_PER_REPORT],
        "sizes": {
            "bare_signed": len(fixture.bare_signed),
            "token_signed": len(fixture.token_signed),
            "ack_message": len(fixture.ack_message),
            "receipt_signed": len(fixture.receipt_signed),
            "ciphertext": len(fixture.ciphertext),
            "audit_entries": [len(entry) for entry in fixture.audit_entries],
        },
        "rounds": rounds,
        "iterations": iterations,
    }


def bound_against(figures: dict[str, Any], bare_rate: float) -> dict[str, float]:
    """The most reports/s a relay doing only its libsodium work reaches on one core,
    over the bare forwarder's measured rate: a bound on the measured ratio itself."""
    most = 1e6 / figures["relay_us"]
    most_without = 1e6 / figures["relay_without_receipt_verify_us"]
    return {
        "relay_max_per_s": most,
        "relay_without_receipt_verify_max_per_s": most_without,
        "bound": most / bare_rate,
        "bound_without_receipt_verify": most_without / bare_rate,
    }


def _verdict(ratio: float) -> str:
    return f"below the {TARGET}x target" if ratio < TARGET else f"NOT below the {TARGET}x target"


def summary_line(figures: dict[str, Any]) -> str:
    """The one line ``python -m bench nodes`` prints after its measured ratio."""
    return (
        f"  ceiling from libsodium work alone: relay needs {figures['relay_us']:.1f} µs/report"
        f" vs bare {figures['bare_us']:.1f} µs/message -> at most {figures['ratio']:.2f}x"
        f" (without the receipt verify: {figures['relay_without_receipt_verify_us']:.1f}"
        f" µs/report -> at most {figures['ratio_without_receipt_verify']:.2f}x)"
    )


def bound_line(bound: dict[str, float], bare_rate: float) -> str:
    """The line ``python -m bench nodes`` prints for :func:`bound_against`."""
    return (
        f"  against the measured bare rate ({bare_rate:.0f}/s): a relay doing only that work"
        f" on one core reaches {bound['relay_max_per_s']:.0f}/s -> at most"
        f" {bound['bound']:.2f}x, {_verdict(bound['bound'])}"
        f" (without the receipt verify {bound['relay_without_receipt_verify_max_per_s']:.0f}/s"
        f" -> {bound['bound_without_receipt_verify']:.2f}x,"
        f" {_verdict(bound['bound_without_receipt_verify'])})"
    )


def report(figures: dict[str, Any]) -> None:
    """Print the figures in full."""
    parts, sizes = figures["parts_us"], figures["sizes"]
    frames = figures["frames"]
    pulls = [f for f in frames if f["direction"] == "pull"]
    pushes = [f for f in frames if f["direction"] == "push"]
    print(f"libsodium work per 1 KiB report (best of {figures['rounds']} rounds"
          f" of {figures['iterations']}):")  # fmt: skip
    label = f"bare forwarder, per message: Ed25519 verify ({sizes['bare_signed']} bytes)"
    print(f"  {label:<82} {figures['bare_us']:8.1f} µs")
    print("  relay, per report, at least:")
    rows = [
        (f"Ed25519 verify of the release token ({sizes['token_signed']} bytes)",
         parts["token_verify"]),
        (f"Ed25519 sign of the stored ack ({sizes['ack_message']} bytes)", parts["ack_sign"]),
        (f"Ed25519 verify of the receipt ({sizes['receipt_signed']} bytes)",
         parts["receipt_verify"]),
        (f"BLAKE2b of the ciphertext ({sizes['ciphertext']} bytes)", parts["ciphertext_digest"]),
        (f"BLAKE2b of {len(figures['audit_entries'])} audit entries"
         f" ({', '.join(figures['audit_entries'])})", parts["audit_digests"]),
        (f"secretstream, {len(pulls)} pulls + {len(pushes)} pushes"
         f" ({sum(f['bytes'] for f in frames)} bytes)", parts["transport"]),
    ]  # fmt: skip
    for label, us in rows:
        print(f"    {label:<80} {us:8.1f} µs")
    print(f"    {'sum of the parts':<80} {sum(parts.values()):8.1f} µs")
    print(f"    {'all together':<80} {figures['relay_us']:8.1f} µs")
    print(f"    {'all together without the receipt verify':<80}"
          f" {figures['relay_without_receipt_verify_us']:8.1f} µs")  # fmt: skip
    print(f"  frames the relay seals (push) or opens (pull), {len(frames)} per report:")
    for peer in ("originator", "recipient"):
        print(f"    {peer}: " + ", ".join(f"{f['direction']} {f['type']} {f['bytes']} B"
                                       for f in frames if f["peer"] == peer))  # fmt: skip
    print(f"  ceiling bare/relay: {figures['ratio']:.2f}x, {_verdict(figures['ratio'])};"
          f" without the receipt verify {figures['ratio_without_receipt_verify']:.2f}x,"
          f" {_verdict(figures['ratio_without_receipt_verify'])}")  # fmt: skip
    print(f"  counting the Ed25519 calls alone: {figures['ratio_ed25519_only']:.2f}x,"
          f" {_verdict(figures['ratio_ed25519_only'])}; without the receipt verify"
          f" {figures['ratio_ed25519_only_without_receipt_verify']:.2f}x,"
          f" {_verdict(figures['ratio_ed25519_only_without_receipt_verify'])}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ceiling", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1:
        parser.error("--rounds and --iterations must be at least 1")
    figures = measure(args.rounds, args.iterations)
    report(figures)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
