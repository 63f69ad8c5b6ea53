"""The I/O layer both nodes share, on trio: the link, the durable store, the files.

Above the sans-IO core (:mod:`tisa`) and below the relay (:mod:`relay`) and the member
library (:mod:`clients`), which use it side by side and never import each other:

* :mod:`tisa_io.link`: a connection after the handshake, as a :class:`Link` that seals,
  frames, queues and writes messages under the limits' deadlines;
  :func:`connect_member` dials a relay and runs the member's side of the handshake.
* :mod:`tisa_io.durable`: SQLite opened as both stores need it (WAL, fsync off the event
  loop where it is long) and :class:`GroupCommitter`, which commits many steps at once.
* :mod:`tisa_io.files`: the files a deployment keeps (key files, arrangement files,
  exported identities) and :func:`load_home`, which opens a home folder the ``tisa``
  command made.
* :mod:`tisa_io.trace`: the benchmarks' tracer (off by default): stamps of a report's
  path, message counts, COMMIT and WAL fsync costs, CPU per trio task, per process.
"""

from __future__ import annotations

from tisa_io.durable import DurableStore, GroupCommitter
from tisa_io.files import Home, load_home, read_arrangement, write_arrangement
from tisa_io.link import Link, LinkClosed, connect_member

__all__ = [
    "DurableStore",
    "GroupCommitter",
    "Home",
    "Link",
    "LinkClosed",
    "connect_member",
    "load_home",
    "read_arrangement",
    "write_arrangement",
]
