"""The member library: a trio node that seals, submits, releases, receives and verifies.

The entry point is :func:`open_node`; a home folder made by the ``tisa`` command opens
with :func:`tisa_io.load_home` (re-exported here)::

    from clients import load_home, open_node

    home = load_home("tokyo", passphrase)
    async with open_node(home.secret, home.name, home.arrangement, ("127.0.0.1", 7420),
                         home.store) as tokyo:
        async for report in tokyo.reports():
            print(report.originator, report.read_body())
            await tokyo.ack(report)  # taken: never handed over again, even after a crash

* :mod:`clients.node`: :class:`Node` and :func:`open_node`.
* :mod:`clients.events`: what :meth:`Node.events` and :meth:`Node.reports` hand over.
* :mod:`clients.store`: the node's durable state (outbox, inbox, seen-set), SQLite.

The member library never imports the relay (:mod:`relay`); both stand on :mod:`tisa_io`.
"""

from __future__ import annotations

from clients.events import (
    DeliveredReport,
    DeliveryRejected,
    Event,
    ExpiredEvent,
    ReceiptEvent,
    RefusedEvent,
    Released,
    ReleaseGap,
    RevokedEvent,
    Stored,
)
from clients.node import Backoff, Node, open_node
from tisa_io.files import Home, load_home

__all__ = [
    "Backoff",
    "DeliveredReport",
    "DeliveryRejected",
    "Event",
    "ExpiredEvent",
    "Home",
    "Node",
    "ReceiptEvent",
    "RefusedEvent",
    "ReleaseGap",
    "Released",
    "RevokedEvent",
    "Stored",
    "load_home",
    "open_node",
]
