"""Tools to attack a tisa deployment in tests: hostile members, a hostile relay, fixtures.

This package is for test suites, ours and other clients'. It stands above the relay
(:mod:`relay`) and the member library (:mod:`clients`), which it runs, and nothing below
it imports it. Its core-level tools (world, hostile, model, fuzzing) import no trio;
:mod:`tisa_testing.relay` and :mod:`tisa_testing.plugin` do.

* :mod:`tisa_testing.world`: a small arrangement with fixed or fresh keys, and helpers
  to seal and release reports in it (no I/O).
* :mod:`tisa_testing.hostile`: what a hostile member or relay can do with the core
  alone: re-seal, strip and re-sign, substitute keys, reuse signatures across kinds,
  malleate signatures, re-encode non-canonically (no I/O).
* :mod:`tisa_testing.model`: a reference recipient built on the core only (token check,
  open, durable seen-set, release counters with gap detection), used by the stateful
  Dolev-Yao test and usable as an oracle for another client.
* :mod:`tisa_testing.secrecy`: forward secrecy checked from a record: what a recorded
  token and ciphertext open with a recipient's long-term key and the prekey secrets its
  store still holds (read-only from its database file); used by the security suite and
  by the demo (no trio).
* :mod:`tisa_testing.relay`: a relay on trio whose misbehaviour each test chooses.
* :mod:`tisa_testing.plugin`: pytest fixtures (entry point ``tisa``).
* :mod:`tisa_testing.pg_server`: a throwaway PostgreSQL server (found or installed,
  started, stopped; or an existing one by address) with a schema per test, and its CPU
  read from /proc; used by the relay's PostgreSQL tests and by ``bench nodes --store``.

See ``docs/security.md``.
"""

from __future__ import annotations

__all__: list[str] = []
