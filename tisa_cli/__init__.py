"""The ``tisa`` application: the command line and the three-node demo, on the libraries.

* :mod:`tisa_cli.commands`: the ``tisa`` command (click); ``tisa relay run`` is the
  relay's own command from :mod:`relay.cli`.
* :mod:`tisa_cli.demo`: ``tisa demo``, Seoul, the Washington relay and Tokyo as three
  processes; :mod:`tisa_cli.demo_member` is one member's process, and
  :mod:`tisa_cli.demo_trace` draws the exchange as a sequence diagram.

The top of the stack: it uses the relay, the member library and the files of
:mod:`tisa_io`, and nothing below imports it.
"""

from __future__ import annotations

__all__: list[str] = []
