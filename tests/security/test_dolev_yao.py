"""The relay as a Dolev-Yao attacker, at the level of the core.

Members seal reports, release them to recipients with tokens, revoke, and recipients
restart (their durable state is a :class:`~tisa_testing.model.RecipientStore`). Everything
a member sends goes through the relay, which here is the attacker: it keeps every byte
string it has seen and may drop, replay, reorder, combine (a token with another report's
ciphertext), alter (bit flips, truncation, chunk splicing, token fields) and deliver
anything to anyone, and it signs with the relay's own key whatever it likes. The
recipients use only the core (:class:`~tisa_testing.model.CoreRecipient`).

Invariants after every step:

* a recipient accepts a report only if its originator released it to that recipient
  and the report lists that recipient;
* no recipient accepts a report twice, across restarts;
* what is accepted is byte for byte what was sealed (header, body, attachments);
* nothing the attacker holds contains a content key or a plaintext body;
* every refusal is a VerificationError, a ProtocolError or a Refused with an expected
  reason (anything else fails the test);
* a release the attacker dropped is noticed: every counter below the highest one a
  recipient saw from an originator, and not seen itself, is reported as a gap.

Budget: about 15 s in CI; ``TISA_SLOW=1`` runs many more and longer sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis import event as _event
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tisa import encoding as enc
from tisa.errors import ProtocolError, Reason, Refused, VerificationError
from tisa.keys import Context
from tisa.report import SealedReport
from tisa.token import ReleaseToken
from tisa_testing import hostile
from tisa_testing.model import CoreRecipient, RecipientStore
from tisa_testing.world import make_world

SLOW = os.environ.get("TISA_SLOW") == "1"

ORIGINATORS = ("seoul", "tokyo")
RECIPIENTS = ("canberra", "seoul", "tokyo")
# Reasons a recipient may give here: the attacker replays, delivers to the wrong member
# and waits for tokens to expire; an originator may release to someone the report does
# not list (an honest mistake the recipient must catch).
EXPECTED_REASONS = {Reason.REPLAYED, Reason.EXPIRED, Reason.WRONG_RECIPIENT}
# Body sizes: empty, tiny (one padding bucket), around the 1 KiB minimum, and just over
# one 64 KiB chunk so that ciphertexts have two chunks to splice.
BODY_SIZES = (0, 16, 40, 1000, 1100, 70_000)
TOKEN_FIELDS = ("recipient", "counter", "digest", "report", "not_after", "scope", "originator")


def event(text: str) -> None:
    """Count an outcome in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        _event(text)


def _body(seed: int, size: int) -> bytes:
    # Derived, not drawn: high-entropy bodies make the substring scans meaningful, and
    # hypothesis still controls (and shrinks) the seed.
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size) if size else b""


@dataclasses.dataclass
class Sealed:
    report: SealedReport
    body: bytes
    attachments: tuple[tuple[str, bytes], ...]


class DolevYao(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = make_world(third_party=True)
        self.stores = {name: RecipientStore() for name in RECIPIENTS}
        self.recipients = {
            name: CoreRecipient(
                self.world.arrangement,
                self.world.secrets[name],
                name,
                self.stores[name],
                prekey_secret=self.world.prekey_lookup(name),
            )
            for name in RECIPIENTS
        }
        self.sealed: dict[bytes, Sealed] = {}  # report id -> what was sealed
        self.by_digest: dict[bytes, bytes] = {}  # ciphertext digest -> ciphertext
        self.released: set[tuple[bytes, str]] = set()  # (report id, recipient)
        self.revoked: set[bytes] = set()
        self.issued: dict[tuple[str, str], int] = {}  # (originator, recipient) -> last
        self.arrived: dict[tuple[str, str], set[int]] = {}  # counters a recipient saw
        self.ciphertexts: list[bytes] = []  # the attacker's knowledge
        self.tokens: list[bytes] = []
        self.secrets: list[bytes] = []  # content keys and plaintext bodies
        self.checked = dict.fromkeys(RECIPIENTS, 0)
        self.accepted = 0

    # --- knowledge -----------------------------------------------------------------------

    def _learn(self, pool: list[bytes], item: bytes) -> None:
        for secret in self.secrets:
            assert secret not in item, "the attacker holds a content key or plaintext"
        pool.append(item)

    def _keep_secret(self, value: bytes) -> None:
        if len(value) < 16:
            return  # too short to be recognisable; the empty body, for one
        for item in self.ciphertexts + self.tokens:
            assert value not in item, "the attacker holds a content key or plaintext"
        self.secrets.append(value)

    # --- members -------------------------------------------------------------------------

    @rule(
        originator=st.sampled_from(ORIGINATORS),
        listed=st.sets(st.sampled_from(RECIPIENTS), min_size=1),
        size=st.sampled_from(BODY_SIZES),
        seed=st.integers(0, 2**32),
        attach=st.booleans(),
    )
    def seal(self, originator: str, listed: set[str], size: int, seed: int, attach: bool) -> None:
        recipients = sorted(listed - {originator}) or [
            next(r for r in RECIPIENTS if r != originator)
        ]
        body = _body(seed, size)
        attachments = (("map.png", _body(seed + 1, 300)),) if attach else ()
        report = self.world.seal(
            body, originator=originator, recipients=recipients, attachments=attachments
        )
        self.sealed[report.report_id] = Sealed(report, body, attachments)
        self.by_digest[report.digest] = report.ciphertext
        self._keep_secret(report.content_key)
        self._keep_secret(body)
        for _, data in attachments:
            self._keep_secret(data)
        # Submitting hands the ciphertext to the relay.
        self._learn(self.ciphertexts, report.ciphertext)

    @precondition(lambda self: self.sealed)
    @rule(
        index=st.integers(0, 2**16),
        recipient=st.sampled_from(RECIPIENTS),
        listed_only=st.booleans(),
        lifetime=st.sampled_from((60, 3600)),
    )
    def release(self, index: int, recipient: str, listed_only: bool, lifetime: int) -> None:
        sealed = list(self.sealed.values())[index % len(self.sealed)]
        header = sealed.report.header
        if listed_only:
            recipient = header.recipients[index % len(header.recipients)]
        if recipient == header.originator:
            return
        key = (header.originator, recipient)
        self.issued[key] = self.issued.get(key, 0) + 1
        token = self.world.token(
            sealed.report,
            recipient,
            counter=self.issued[key],
            not_after=self.world.now + lifetime,
        )
        self.released.add((sealed.report.report_id, recipient))
        self._learn(self.tokens, token)

    @precondition(lambda self: self.tokens)
    @rule(index=st.integers(0, 2**16))
    def revoke(self, index: int) -> None:
        # The originator withdraws a token. Enforcing that is the relay's job, and this
        # relay is the attacker, so nothing changes at the recipient: the invariants
        # hold whether or not a revoked token is delivered afterwards.
        self.revoked.add(self.tokens[index % len(self.tokens)])

    @rule(name=st.sampled_from(RECIPIENTS))
    def restart(self, name: str) -> None:
        """The recipient's process restarts: only its durable store survives."""
        self.recipients[name] = CoreRecipient(
            self.world.arrangement,
            self.world.secrets[name],
            name,
            self.stores[name],
            prekey_secret=self.world.prekey_lookup(name),
        )

    @rule(seconds=st.integers(1, 5000))
    def tick(self, seconds: int) -> None:
        self.world.now += seconds

    # --- the attacker --------------------------------------------------------------------

    def _deliver(self, token: bytes, ciphertext: bytes, recipient: str) -> None:
        try:
            self.recipients[recipient].receive(token, ciphertext, now=self.world.now)
        except (VerificationError, ProtocolError) as exc:
            event(f"refused: {type(exc).__name__}")
            return
        except Refused as exc:
            assert exc.reason in EXPECTED_REASONS, exc
            event(f"refused: {exc.reason.value}")
            if exc.reason is Reason.REPLAYED:
                self._arrived(token, recipient)
            return
        self._arrived(token, recipient)
        self.accepted += 1
        event("accepted")

    def _arrived(self, token: bytes, recipient: str) -> None:
        t = ReleaseToken.decode(token)
        self.arrived.setdefault((t.originator, recipient), set()).add(t.counter)

    @precondition(lambda self: self.tokens)
    @rule(index=st.integers(0, 2**16))
    def forward(self, index: int) -> None:
        """Deliver a token with the ciphertext it names, to the recipient it names."""
        token = self.tokens[index % len(self.tokens)]
        try:
            t = ReleaseToken.decode(token)
        except ProtocolError:
            return
        ciphertext = self.by_digest.get(t.digest)
        if ciphertext is not None and t.recipient in self.recipients:
            self._deliver(token, ciphertext, t.recipient)

    @precondition(lambda self: self.tokens and self.ciphertexts)
    @rule(
        token=st.integers(0, 2**16),
        ciphertext=st.integers(0, 2**16),
        recipient=st.sampled_from(RECIPIENTS),
    )
    def deliver(self, token: int, ciphertext: int, recipient: str) -> None:
        """Deliver anything with anything to anyone (replays and reorders included)."""
        self._deliver(
            self.tokens[token % len(self.tokens)],
            self.ciphertexts[ciphertext % len(self.ciphertexts)],
            recipient,
        )

    @precondition(lambda self: self.ciphertexts)
    @rule(index=st.integers(0, 2**16), bit=st.integers(0, 2**24), token_too=st.booleans())
    def flip(self, index: int, bit: int, token_too: bool) -> None:
        pool = self.tokens if token_too and self.tokens else self.ciphertexts
        self._learn(pool, hostile.flip_bit(pool[index % len(pool)], bit))

    @precondition(lambda self: self.ciphertexts)
    @rule(index=st.integers(0, 2**16), cut=st.integers(1, 2**17), token_too=st.booleans())
    def truncate(self, index: int, cut: int, token_too: bool) -> None:
        pool = self.tokens if token_too and self.tokens else self.ciphertexts
        item = pool[index % len(pool)]
        if item:
            self._learn(pool, hostile.truncate(item, len(item) - 1 - cut % len(item)))

    @precondition(lambda self: len(self.ciphertexts) > 1)
    @rule(a=st.integers(0, 2**16), b=st.integers(0, 2**16), chunk=st.integers(0, 1))
    def splice(self, a: int, b: int, chunk: int) -> None:
        target = self.ciphertexts[a % len(self.ciphertexts)]
        source = self.ciphertexts[b % len(self.ciphertexts)]
        spans_t, spans_s = hostile.chunk_spans(len(target)), hostile.chunk_spans(len(source))
        if chunk < min(len(spans_t), len(spans_s)):
            self._learn(self.ciphertexts, hostile.splice_chunk(target, source, chunk))

    @precondition(lambda self: self.tokens)
    @rule(
        index=st.integers(0, 2**16),
        field=st.sampled_from(TOKEN_FIELDS),
        other=st.integers(0, 2**16),
    )
    def edit_token(self, index: int, field: str, other: int) -> None:
        """Change one field of a token, keeping its signature (or taking it from another
        token's field of the same name)."""
        token = self.tokens[index % len(self.tokens)]
        donor = self.tokens[other % len(self.tokens)]
        try:
            body, signature = hostile.envelope_parts(token)
            fields = enc.unpack(body)
            fields[field] = enc.unpack(hostile.envelope_parts(donor)[0])[field]
        except (ProtocolError, KeyError):
            return
        # .get: a token whose body had a bit flipped may lack the field (a renamed key).
        if field == "recipient" and fields[field] == enc.unpack(body).get(field):
            fields[field] = RECIPIENTS[other % len(RECIPIENTS)]
        if (
            field == "counter"
            and isinstance(fields[field], int)
            and fields[field] == enc.unpack(body).get(field)
        ):
            fields[field] += 1
        self._learn(self.tokens, enc.pack({"body": enc.pack(fields), "sig": signature}))

    @precondition(lambda self: self.ciphertexts)
    @rule(
        index=st.integers(0, 2**16),
        recipient=st.sampled_from(RECIPIENTS),
        claim=st.sampled_from(ORIGINATORS),
    )
    def forge(self, index: int, recipient: str, claim: str) -> None:
        """The relay signs a token of its own, with a key it chose, for a ciphertext."""
        ciphertext = self.ciphertexts[index % len(self.ciphertexts)]
        key = hashlib.sha256(ciphertext).digest()
        report_id = ciphertext[:16].ljust(16, b"\0")
        world = self.world
        token = hostile.forge_token(
            world.secrets[world.relay],
            world.arrangement,
            recipient=recipient,
            report_id=report_id,
            digest_=hashlib.blake2b(ciphertext, digest_size=32).digest(),
            size=max(len(ciphertext), 1),
            content_key=key,
            scope="nk.missile",
            level="secret",
            not_before=world.now - 10,
            not_after=world.now + 60,
            originator=claim,
            context=Context.TOKEN,
            # The relay holds every recipient's published prekeys: it wraps to them.
            signed_prekey=world.signed_prekey_key(recipient),
        )
        self._learn(self.tokens, token)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def accepted_only_what_was_released_exactly_once(self) -> None:
        for name, store in self.stores.items():
            inbox = store.inbox
            for delivered in inbox[self.checked[name] :]:
                report = delivered.report
                rid = report.header.id
                assert (rid, name) in self.released, "accepted without a release"
                sealed = self.sealed[rid]
                assert name in sealed.report.header.recipients
                assert report.header == sealed.report.header
                assert report.body == sealed.body
                assert report.attachments == dict(sealed.attachments)
            self.checked[name] = len(inbox)
            ids = [d.report.header.id for d in inbox]
            assert len(ids) == len(set(ids)), "a report was accepted twice"

    @invariant()
    def dropped_releases_are_noticed(self) -> None:
        for (originator, recipient), arrived in self.arrived.items():
            counters = self.stores[recipient].counters
            high = max(arrived)
            assert counters.highest(originator) == high
            assert counters.gaps(originator) == set(range(1, high + 1)) - arrived


DolevYao.TestCase.settings = settings(
    max_examples=3000 if SLOW else 300,
    stateful_step_count=100 if SLOW else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDolevYao = DolevYao.TestCase


def test_the_machine_accepts_honest_deliveries() -> None:
    # The control: without an attacker, everything released is accepted once.
    machine = DolevYao()
    machine.seal("seoul", {"tokyo", "canberra"}, 1000, 7, True)
    machine.release(0, "tokyo", False, 3600)
    machine.release(0, "canberra", False, 3600)
    machine.forward(0)
    machine.forward(1)
    machine.forward(0)  # a replay
    machine.accepted_only_what_was_released_exactly_once()
    machine.dropped_releases_are_noticed()
    assert machine.accepted == 2
    assert len(machine.stores["tokyo"].inbox) == 1
    assert len(machine.stores["canberra"].inbox) == 1
