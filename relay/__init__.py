"""The relay: stores sealed reports, checks and consumes release tokens, forwards.

Three ways to run one, the same relay each time:

* ``python -m relay run --home washington`` or ``tisa --home washington relay run``: the
  command line (:mod:`relay.cli`, one click command behind both);
* :func:`serve` in a trio program::

      from relay import load_home, serve

      home = load_home("washington", passphrase)
      port = await nursery.start(serve, home.secret, home.arrangement, home.store)

* :class:`Relay` over any stream (tests drive it over memory streams).

* :mod:`relay.server`: :class:`Relay` and :func:`serve`.
* :mod:`relay.store`: the relay's durable state (SQLite, ciphertext files beside it).
* :mod:`relay.cli`: the ``run`` command.

The relay never imports the member library (:mod:`clients`); both stand on :mod:`tisa_io`.
"""

from __future__ import annotations

from relay.server import Relay, serve
from tisa_io.files import Home, load_home

__all__ = ["Home", "Relay", "load_home", "serve"]
