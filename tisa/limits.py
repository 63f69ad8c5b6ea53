"""Every limit of the protocol, named, with the reason for its default.

Nodes take a :class:`Limits` value so each number can be changed per deployment; the
module-level constants are the defaults. Every limit has a test that crosses it.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "CHUNK_SIZE",
    "CLOCK_SKEW",
    "DEFAULT_LIMITS",
    "Limits",
    "MAX_ATTACHMENTS",
    "MAX_FRAME",
    "MAX_HEADER",
    "MAX_INLINE_CIPHERTEXT",
    "MAX_INLINE_TOKENS",
    "MAX_NAME",
    "MAX_REPORT_SIZE",
    "ZERO_MEANS_OFF",
]

# Plaintext bytes per secretstream chunk. 64 KiB keeps per-chunk overhead (17 bytes of
# tag, one Python call) under 0.03% while a chunk still fits comfortably in a frame.
CHUNK_SIZE = 64 * 1024

# Largest frame accepted on the wire, checked from the length prefix before the body is
# read. One chunk of report ciphertext plus msgpack and channel overhead fits with room;
# anything larger is a peer we do not want to buffer for.
MAX_FRAME = 256 * 1024

# Largest report ciphertext that travels inside one message (``submit_inline`` from the
# originator, ``deliver_inline`` to a recipient) instead of a chunk stream. 64 KiB is
# one secretstream chunk of plaintext (a report of at most about 64 KiB of content): with
# the tokens beside it the message stays far under MAX_FRAME (256 KiB), and it covers
# the short reports real-time sharing sends. A protocol constant: one byte over, a
# report is streamed; an inline message carrying more is malformed.
MAX_INLINE_CIPHERTEXT = 64 * 1024

# Release tokens in one ``submit_inline``: 32 envelopes of at most 2 KiB each (64 KiB)
# beside a full inline report still fit a frame with room; an originator releasing to
# more recipients at once sends the rest as ``release`` messages.
MAX_INLINE_TOKENS = 32

# Largest sealed report (ciphertext bytes). Reports stream through every node in constant
# memory, so this bounds disk use, not RAM: 4 GiB.
MAX_REPORT_SIZE = 4 * 1024**3

# Largest signed report header inside the plaintext (metadata, recipient list, attachment
# names). Recipients must buffer it whole before streaming the body, so it is small.
MAX_HEADER = 64 * 1024

# Attachments per report; each has a name in the header. A protocol constant (part of
# the header schema), so a sealer refuses more and every recipient agrees on it.
MAX_ATTACHMENTS = 64

# Member, scope, level and attachment names, in UTF-8 bytes.
MAX_NAME = 128

# Seconds of clock difference tolerated when checking a token's validity window: enough
# for ordinary NTP drift between three sites, small enough not to extend a window much.
CLOCK_SKEW = 120


# The limits that may be 0, which turns off what they bound (every other one must be
# positive).
ZERO_MEANS_OFF = frozenset({"prekey_pool"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Limits a node enforces; every field defaults to the module constant of its name.

    Node-only limits (connections, deadlines, queue lengths) live here too so a deployment
    configures one object.
    """

    max_frame: int = MAX_FRAME
    max_report_size: int = MAX_REPORT_SIZE
    # A node may lower the header limit below the protocol's MAX_HEADER, not raise it.
    max_header: int = MAX_HEADER
    clock_skew: int = CLOCK_SKEW
    # Seconds a peer has to finish the handshake: three small messages on any live link.
    handshake_timeout: float = 10.0
    # Seconds a peer has to finish sending one frame once its first byte arrived; a
    # slow-loris peer is cut off at this point.
    frame_timeout: float = 30.0
    # Seconds without any frame before a connection is closed as idle.
    idle_timeout: float = 300.0
    # Concurrent connections to a relay, in all and per member.
    max_connections: int = 256
    max_connections_per_member: int = 8
    # Connections in their handshake at once (not yet authenticated, so not counted
    # against max_connections: members have room of their own). Each costs one task and
    # a 1 KiB buffer for at most handshake_timeout. When full, a new connection sheds
    # the oldest handshake of the source holding the most, instead of being refused.
    max_handshakes: int = 1024
    # Handshakes in progress from one source address (an IPv6 /64): a member's node
    # needs one at a time, a NAT of many members a few; past it the source's own oldest
    # handshake is shed, so one address cannot take the slots others need.
    max_handshakes_per_source: int = 32
    # Deliveries queued for one recipient before the relay refuses new releases to it.
    max_queue_per_recipient: int = 10_000
    # Reports of at most this many ciphertext bytes are kept inside a node's database
    # (one row, one commit) instead of as a file beside it (write, fsync, rename,
    # directory fsync, then the commit). 64 KiB is one chunk: larger reports stream.
    max_inline_report: int = 64 * 1024
    # Deliveries the relay pushes on one connection before the recipient has acked
    # them: enough to keep a link busy between acks, few enough that a recipient that
    # stops acking ties up little.
    delivery_window: int = 256
    # Messages a member's node reads from its link ahead of the one it is handling, so
    # that a prekey_status written behind a delivery window's worth of deliveries (and
    # their receipts' acks) is acted on at once rather than after them (the node handles
    # the rest in order): twice delivery_window. Reading also stops while the messages
    # read ahead hold read_ahead_bytes (their byte strings, plus 256 bytes each), so
    # at most that plus one frame: a relay sending large frames ties up little.
    read_ahead: int = 512
    read_ahead_bytes: int = 4 * 1024 * 1024
    # Seconds a connection has to acknowledge a delivery pushed on it (counted from the
    # last frame of the delivery it took) before its claim lapses and the member's other
    # connections may push the delivery too: a stale connection (a dropped network
    # leaves one behind) must not hold deliveries until idle_timeout. Short, because the
    # only cost of lapsing is a second copy on the wire, which the recipient drops.
    claim_timeout: float = 1.0
    # TCP keepalive on the relay's and members' sockets, so that a peer that vanished
    # without a FIN or RST is detected: first probe after keepalive_idle seconds of
    # silence, then every keepalive_interval, dead after keepalive_probes unanswered.
    # Data unacknowledged by the peer's TCP for the same total time also ends the link.
    keepalive_idle: float = 30.0
    keepalive_interval: float = 10.0
    keepalive_probes: int = 3
    # Refusals of one member's input the relay writes to its audit log per minute. Every
    # refusal is still answered; past this rate one entry with reason "limit" says that
    # the rest of that minute went unlogged, so a member cannot grow the log at will.
    max_logged_refusals_per_minute: int = 600
    # Release requests one member may send in any hour (a sliding window over the
    # requests the relay stored). A request is a person asking a partner capital for a
    # report: 60 an hour is far above that pace, and bounds how fast a member can fill
    # an originator's queue or the audit log. Past it the relay refuses "rate_limited".
    max_requests_per_hour: int = 60
    # --- prekeys (forward secrecy) ---
    # One-time prekeys the relay stores per member; a publish past it is refused with
    # "limit", so a member cannot fill the relay's disk with them.
    max_one_time_prekeys: int = 500
    # The relay tells a member its one-time supply runs low (a prekey_status) when a
    # handout leaves fewer than this; the member's node then replenishes below it too.
    # Sized to the handouts one top-up's round trip lasts (the notice, the new secrets
    # on disk, the publish stored; 200-400 ms on a loaded 2-core machine) at a burst's
    # pace (100-300 reports/s), plus the fetches one originator may have in flight (64
    # submit calls in the bench): at 20, 16-25 % of a 2,000-report burst found the
    # supply empty (docs/node-protocol.md, "Sizing the supply").
    prekey_low_water: int = 100
    # One-time prekeys of one recipient the relay hands one originator in any hour
    # (relay.prekeystore); past it a prekeys_fetch is answered with the signed prekey
    # only, as when the supply is exhausted (the token says so), and the relay logs it
    # once per hour and pair (refused, rate_limited). A greedy or hostile originator
    # cannot drain a recipient's supply, nor make it generate prekeys without end: each
    # costs the recipient a key pair and a signature, and the relay a row kept until 30
    # days after the prekey's lifetime. 1,000 an hour (one every 3.6 s, sustained) is far
    # above the pace of releases from one partner to another, and a burst of up to 1,000
    # reports in an hour still gets one-time prekeys (as far as the recipient's supply,
    # one_time_prekeys, keeps up).
    max_one_time_prekeys_per_hour: int = 1000
    # One-time prekeys a node keeps published: it tops its supply up to this many
    # (at most max_one_time_prekeys). Three times prekey_low_water: a top-up of about
    # 200, two or three messages, per 200 reports in a burst.
    one_time_prekeys: int = 300
    # Seconds between two signed prekeys of a node; each is valid for two periods, so a
    # node that misses its rotation for a while is still reachable.
    signed_prekey_rotation: int = 7 * 86400
    # Seconds a node keeps a prekey secret past the prekey's not_after, for tokens
    # sealed to it just before then and delivered late: one longest token validity
    # (30 days) and the clock skew. Shorter makes such late tokens unopenable.
    signed_prekey_grace: int = 30 * 86400 + CLOCK_SKEW
    # Seconds a one-time prekey stays valid unused (then its secret is deleted after the
    # grace as well): bounds how long an unused secret sits on the disk.
    one_time_prekey_lifetime: int = 90 * 86400
    # Seconds an originator's node waits for a recipient's signed prekey to appear at
    # the relay (a recipient that has not connected yet) before refusing the release
    # with no_prekey, or falling back where the arrangement allows it.
    prekey_wait: float = 30.0
    # Prekey bundles an originator's node asks for in one write: the releases waiting
    # for their token, oldest first, one fetch each (their tokens are then issued in
    # order), or a pool refill, one fetch per recipient of several bundles (protocol
    # version 4). One round trip per batch instead of one per token; at most half of
    # prekey_low_water, so that a
    # batch for one recipient never takes more one-time prekeys than the relay still
    # holds past its low-supply notice, and a second batch finds the recipient's top-up
    # on its way rather than an empty supply.
    max_prekey_fetches: int = 10
    # Prekey bundles (a signed and a one-time prekey, handed out by the relay) an
    # originator's node keeps ahead per recipient, so that a connected submit issues its
    # tokens without a round trip to the relay and its commit; refilled in the
    # background (at most max_prekey_fetches per write) once fewer than half are left.
    # Kept in memory only: the bundles held when the node stops are one-time prekeys
    # handed out and never used (the recipient deletes their secrets once they expire),
    # so this also bounds that waste per recipient and restart. 16: at 100 reports/s to
    # one recipient, 80 ms of reports while a refill (one write of up to 10 fetches,
    # one relay commit) is in flight; and well under prekey_low_water (100), the
    # reserve the relay keeps before it asks the recipient to top up, so one
    # originator's pool is a small part of a recipient's supply (one_time_prekeys,
    # 300). 0 turns the pool
    # off (a round trip per submit, as before).
    prekey_pool: int = 16
    # Recipients an originator's node keeps a prekey pool for (started on the first
    # submit that releases to one); past it a recipient's tokens fetch their prekeys per
    # submit. Bounds the pool's memory and its waste at prekey_pool times this: 16
    # recipients, 256 bundles of about 500 bytes.
    prekey_pool_recipients: int = 16

    def __post_init__(self) -> None:
        from tisa.errors import UsageError

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and field.name not in ZERO_MEANS_OFF)
            ):
                raise UsageError(f"limit {field.name} must be a positive number, not {value!r}")
        if self.max_header > MAX_HEADER:
            raise UsageError(f"limit max_header cannot exceed the protocol's {MAX_HEADER}")


DEFAULT_LIMITS = Limits()
