"""Benchmark of the protocol core against the raw PyNaCl floor, measured in the same run.

Per role, for a 1 KiB report:

* originator: seal (sign, pad, encrypt) + one release token with prekeys, against the
  same libsodium calls made directly (BLAKE2b x3, Ed25519 sign x2 and verify x2 for the
  prekeys, X25519 x4, secretstream, XChaCha20-Poly1305);
* relay: the token check, against one Ed25519 verification;
* recipient: token check + unwrap + open + verify, against the same libsodium calls;
* the token alone, issued with a signed and a one-time prekey and opened (checked and
  unwrapped), against its raw operations: the cost of forward secrecy per token.

Then sealing and opening a large report (default 256 MiB) streamed in chunks, against a
bare secretstream loop over the same chunks, each in a fresh subprocess so its peak RSS
can be read; run at two sizes to show that peak memory does not grow with the report.

Floor and toolkit are measured in alternating rounds and the best round of each is
kept, so a noisy neighbour slows both alike.

    python -m bench core [--large-mib 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import nacl.bindings as b

from bench import targets
from tisa.arrangement import Arrangement, Member, Role
from tisa.keys import MemberSecret
from tisa.limits import CHUNK_SIZE
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.report import ReportSealer, seal_report
from tisa.token import check_for_recipient, check_for_relay, issue_token

__all__ = ["large", "main", "per_role"]

NOW = 1_700_000_000
TAG_MESSAGE = b.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = b.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def _setup() -> tuple[Arrangement, dict[str, MemberSecret]]:
    secrets = {n: MemberSecret.generate() for n in ("seoul", "tokyo", "washington")}
    roles = {
        "seoul": {Role.ORIGINATOR, Role.RECIPIENT},
        "tokyo": {Role.ORIGINATOR, Role.RECIPIENT},
        "washington": {Role.RELAY},
    }
    arrangement = Arrangement(
        name="trilateral-2014",
        version=1,
        members=tuple(
            Member(name=n, identity=secrets[n].public, roles=frozenset(roles[n])) for n in secrets
        ),
        relay="washington",
        scopes=("nk.missile", "nk.nuclear"),
        levels=("routine", "secret"),
        created=NOW,
    )
    return arrangement, secrets


def _best_per_op(fn: Callable[[], object], iterations: int) -> float:
    # CPU time of this thread: a wall clock would count the time other tenants of a
    # shared machine hold the core, and move the floor and the toolkit unevenly.
    start = time.thread_time()
    for _ in range(iterations):
        fn()
    return (time.thread_time() - start) / iterations


def _compare(
    label: str, tool: Callable[[], object], floor: Callable[[], object], rounds: int, n: int
) -> dict[str, float]:
    tool_best = floor_best = float("inf")
    for _ in range(rounds):
        floor_best = min(floor_best, _best_per_op(floor, n))
        tool_best = min(tool_best, _best_per_op(tool, n))
    ratio = tool_best / floor_best
    print(
        f"  {label:<11} toolkit {tool_best * 1e6:8.1f} us   floor {floor_best * 1e6:8.1f} us"
        f"   ratio {ratio:5.2f}x"
    )
    print(targets.line(f"core {label}", ratio, "x", targets.CORE_RATIO,
                       f"raw libsodium {floor_best * 1e6:.1f} µs"))  # fmt: skip
    return {"toolkit_us": tool_best * 1e6, "floor_us": floor_best * 1e6, "ratio": ratio,
            "load": targets.load_average()}  # fmt: skip


def per_role(rounds: int, n: int) -> dict[str, dict[str, float]]:
    arrangement, secrets = _setup()
    seoul, tokyo = secrets["seoul"], secrets["tokyo"]
    body = os.urandom(1024)

    prekeys = {
        kind: PrekeySecret.generate(kind, created=NOW - 60, not_after=NOW + 86400)
        for kind in PrekeyKind
    }
    published = {
        kind: prekey.publish(tokyo, "tokyo", arrangement) for kind, prekey in prekeys.items()
    }

    def lookup(kind: PrekeyKind, public: bytes) -> bytes:
        return prekeys[kind].secret

    def issue(sealed: Any) -> bytes:
        return issue_token(
            seoul, "seoul", arrangement, recipient="tokyo", report_id=sealed.report_id,
            digest=sealed.digest, size=sealed.size, content_key=sealed.content_key,
            scope="nk.missile", level="secret", not_before=NOW, not_after=NOW + 3600, counter=1,
            signed_prekey=published[PrekeyKind.SIGNED],
            one_time_prekey=published[PrekeyKind.ONE_TIME],
        )  # fmt: skip

    def originator() -> tuple[Any, bytes]:
        sealed = seal_report(
            seoul, "seoul", arrangement, recipients=["tokyo"], scope="nk.missile",
            level="secret", body=body, now=NOW,
        )  # fmt: skip
        return sealed, issue(sealed)

    sealed, token = originator()
    _, sk = b.crypto_sign_seed_keypair(os.urandom(32))
    pk = sk[32:]
    box_sk = os.urandom(32)
    box_pk = b.crypto_scalarmult_base(box_sk)
    person = b"tisa1-ciphertext"
    padded = sealed.size - 24 - 17
    spk_sk, opk_sk = os.urandom(32), os.urandom(32)
    spk_pk, opk_pk = b.crypto_scalarmult_base(spk_sk), b.crypto_scalarmult_base(opk_sk)
    prekey_message = b"p" * 150 + spk_pk
    prekey_sig = b.crypto_sign(prekey_message, sk)[:64]
    aad = b"t" * 330
    nonce = bytes(24)
    wrap_person = b"tisa1-prekeywrap"

    def wrap_key(shared: bytes, eph_pk: bytes) -> bytes:
        return bytes(
            b.crypto_generichash_blake2b_salt_personal(
                shared + b"one_time\n" + eph_pk + box_pk + spk_pk + opk_pk,
                digest_size=32,
                person=wrap_person,
            )
        )

    def wrap_floor(key: bytes) -> bytes:
        # Two prekey signatures checked, the ephemeral key, three X25519, the derivation
        # and the AEAD: what issue_token adds for forward secrecy.
        b.crypto_sign_open(prekey_sig + prekey_message, pk)
        b.crypto_sign_open(prekey_sig + prekey_message, pk)
        eph_sk = os.urandom(32)
        eph_pk = b.crypto_scalarmult_base(eph_sk)
        shared = b"".join(b.crypto_scalarmult(eph_sk, k) for k in (box_pk, spk_pk, opk_pk))
        wrapping = wrap_key(shared, eph_pk)
        return bytes(b.crypto_aead_xchacha20poly1305_ietf_encrypt(key, aad, nonce, wrapping))

    floor_eph_sk = os.urandom(32)
    floor_eph_pk = b.crypto_scalarmult_base(floor_eph_sk)

    def unwrap_floor(sealed_key: bytes) -> bytes:
        shared = b"".join(b.crypto_scalarmult(k, floor_eph_pk) for k in (box_sk, spk_sk, opk_sk))
        wrapping = wrap_key(shared, floor_eph_pk)
        return bytes(b.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed_key, aad, nonce, wrapping))

    wrapped_key = wrap_key(
        b"".join(b.crypto_scalarmult(floor_eph_sk, k) for k in (box_pk, spk_pk, opk_pk)),
        floor_eph_pk,
    )

    def originator_floor() -> bytes:
        key = os.urandom(32)
        signature = b.crypto_sign(b"h" * 230, sk)[:64]
        state = b.crypto_secretstream_xchacha20poly1305_state()
        header = b.crypto_secretstream_xchacha20poly1305_init_push(state, key)
        plain = body + signature + bytes(padded - len(body) - 64)
        chunk = b.crypto_secretstream_xchacha20poly1305_push(state, plain, b"i" * 16, TAG_FINAL)
        b.crypto_generichash_blake2b_salt_personal(header + chunk, digest_size=32, person=person)
        b.crypto_generichash_blake2b_salt_personal(
            b"i" * 16, digest_size=32, key=key, person=person
        )
        wrapped = wrap_floor(key)
        return bytes(b.crypto_sign(b"t" * 300 + wrapped, sk)[:64])

    token_message = b"t" * 300 + os.urandom(80)
    token_sig = b.crypto_sign(token_message, sk)[:64]

    def relay() -> object:
        return check_for_relay(
            token, arrangement, report_id=sealed.report_id, digest=sealed.digest,
            size=sealed.size, originator="seoul", now=NOW,
        )  # fmt: skip

    def relay_floor() -> object:
        return b.crypto_sign_open(token_sig + token_message, pk)

    def recipient() -> object:
        release = check_for_recipient(
            token, arrangement, tokyo, "tokyo", now=NOW, prekey_secret=lookup
        )
        opener = release.opener(arrangement)
        opener.feed(sealed.ciphertext)
        return opener.finish()

    key = os.urandom(32)
    sealed_key = bytes(b.crypto_aead_xchacha20poly1305_ietf_encrypt(key, aad, nonce, wrapped_key))
    state = b.crypto_secretstream_xchacha20poly1305_state()
    stream_header = b.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    inner_message = b"h" * 200 + os.urandom(32)
    inner_sig = b.crypto_sign(inner_message, sk)[:64]
    chunk = b.crypto_secretstream_xchacha20poly1305_push(
        state, os.urandom(padded), b"i" * 16, TAG_FINAL
    )

    def recipient_floor() -> object:
        b.crypto_sign_open(token_sig + token_message, pk)
        opened_key = unwrap_floor(sealed_key)
        b.crypto_generichash_blake2b_salt_personal(
            b"i" * 16, digest_size=32, key=opened_key, person=person
        )
        pull = b.crypto_secretstream_xchacha20poly1305_state()
        b.crypto_secretstream_xchacha20poly1305_init_pull(pull, stream_header, opened_key)
        b.crypto_secretstream_xchacha20poly1305_pull(pull, chunk, b"i" * 16)
        b.crypto_generichash_blake2b_salt_personal(
            stream_header + chunk, digest_size=32, person=person
        )
        return b.crypto_sign_open(inner_sig + inner_message, pk)

    def token_issue() -> bytes:
        return issue(sealed)

    def token_issue_floor() -> bytes:
        wrapped = wrap_floor(key)
        b.crypto_generichash_blake2b_salt_personal(
            b"i" * 16, digest_size=32, key=key, person=person
        )
        return bytes(b.crypto_sign(b"t" * 330 + wrapped, sk)[:64])

    def token_open() -> object:
        return check_for_recipient(
            token, arrangement, tokyo, "tokyo", now=NOW, prekey_secret=lookup
        )

    def token_open_floor() -> object:
        b.crypto_sign_open(token_sig + token_message, pk)
        opened_key = unwrap_floor(sealed_key)
        return b.crypto_generichash_blake2b_salt_personal(
            b"i" * 16, digest_size=32, key=opened_key, person=person
        )

    print("per-role cost, 1 KiB report (best of rounds):")
    return {
        "originator": _compare("originator", originator, originator_floor, rounds, n),
        "relay": _compare("relay", relay, relay_floor, rounds, n),
        "recipient": _compare("recipient", recipient, recipient_floor, rounds, n),
        "token_issue": _compare("token issue", token_issue, token_issue_floor, rounds, n),
        "token_open": _compare("token open", token_open, token_open_floor, rounds, n),
    }


# --- large reports, one subprocess per measurement ---------------------------------------


def _large_child(mode: str, size: int) -> dict[str, float]:
    """Seal ``size`` bytes to a temporary file, then open it; both streamed."""
    import tempfile

    arrangement, secrets = _setup()
    prekey = PrekeySecret.generate(PrekeyKind.SIGNED, created=NOW - 60, not_after=NOW + 86400)
    published = prekey.publish(secrets["tokyo"], "tokyo", arrangement)
    piece = os.urandom(CHUNK_SIZE)
    count = size // CHUNK_SIZE
    read_size = CHUNK_SIZE + 17
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "report.bin")
        start = time.perf_counter()
        if mode == "floor":
            key = os.urandom(32)
            push = b.crypto_secretstream_xchacha20poly1305_state()
            with open(path, "wb") as out:
                header = b.crypto_secretstream_xchacha20poly1305_init_push(push, key)
                for i in range(count):
                    tag = TAG_FINAL if i == count - 1 else TAG_MESSAGE
                    out.write(
                        b.crypto_secretstream_xchacha20poly1305_push(push, piece, b"i" * 16, tag)
                    )
            pull = b.crypto_secretstream_xchacha20poly1305_state()
            b.crypto_secretstream_xchacha20poly1305_init_pull(pull, header, key)
            with open(path, "rb") as source:
                while chunk := source.read(read_size):
                    b.crypto_secretstream_xchacha20poly1305_pull(pull, chunk, b"i" * 16)
        else:
            sealer = ReportSealer(
                secrets["seoul"], "seoul", arrangement, recipients=["tokyo"],
                scope="nk.missile", level="secret", body_size=count * CHUNK_SIZE, now=NOW,
            )  # fmt: skip
            with open(path, "wb") as out:
                out.write(sealer.start())
                for _ in range(count):
                    out.write(sealer.write(piece))
                for piece in sealer.finish_iter():
                    out.write(piece)
            token = issue_token(
                secrets["seoul"], "seoul", arrangement, recipient="tokyo",
                report_id=sealer.report_id, digest=sealer.digest, size=sealer.size,
                content_key=sealer.content_key, scope="nk.missile", level="secret",
                not_before=NOW, not_after=NOW + 3600, counter=1, signed_prekey=published,
            )  # fmt: skip
            release = check_for_recipient(
                token, arrangement, secrets["tokyo"], "tokyo", now=NOW,
                prekey_secret=lambda kind, public: prekey.secret,
            )  # fmt: skip
            opener = release.opener(arrangement)
            with open(path, "rb") as source:
                while chunk := source.read(read_size):
                    opener.feed(chunk)
            opener.finish()
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": elapsed, "peak_mib": peak}


def _run_child(mode: str, size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.core", "--child", mode, str(size)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def large(mib: int, rounds: int) -> dict[str, object]:
    size = mib * 1024 * 1024
    results: dict[str, object] = {}
    print(f"large report, {mib} MiB: seal then open, streamed (best of {rounds}):")
    best_tool = best_floor = float("inf")
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        floor = _run_child("floor", size)
        tool = _run_child("toolkit", size)
        best_floor = min(best_floor, floor["seconds"])
        best_tool = min(best_tool, tool["seconds"])
        peaks = {"floor": floor["peak_mib"], "toolkit": tool["peak_mib"]}
    rate_tool = 2 * mib / best_tool
    rate_floor = 2 * mib / best_floor
    print(
        f"  toolkit {rate_tool:7.1f} MiB/s  floor {rate_floor:7.1f} MiB/s"
        f"   rate ratio {rate_tool / rate_floor:5.2f}x"
    )
    print(targets.line(f"{mib} MiB seal then open", rate_tool / rate_floor, "x",
                       targets.LARGE_RATIO, f"bare secretstream {rate_floor:.0f} MiB/s",
                       at_most=False))  # fmt: skip
    small = _run_child("toolkit", 16 * 1024 * 1024)
    print(
        f"  peak RSS: toolkit {peaks['toolkit']:.1f} MiB at {mib} MiB, "
        f"{small['peak_mib']:.1f} MiB at 16 MiB (floor {peaks['floor']:.1f} MiB)"
    )
    results.update(
        rate_toolkit=rate_tool,
        rate_floor=rate_floor,
        rate_ratio=rate_tool / rate_floor,
        peak_mib=peaks,
        peak_mib_16=small["peak_mib"],
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench core", description=__doc__)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_large_child(args.child[0], int(args.child[1]))))
        return 0
    figures = {
        "per_role": per_role(args.rounds, args.iterations),
        "large": large(args.large_mib, max(1, args.rounds // 3)),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
