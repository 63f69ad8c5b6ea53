"""Benchmarks, run on demand (never in CI): ``python -m bench [core|nodes]``.

Each benchmark measures its floor (raw PyNaCl, a bare trio forwarder) in the same run
and prints the ratio, since the machines are shared and absolute figures drift.
"""

__all__: list[str] = []
