"""``python -m bench [NAME] [ARGS]``: run one benchmark (default: core).

Names: ``core`` (the protocol core against raw PyNaCl), ``nodes`` (the three trio nodes
against a bare forwarder), ``ceiling`` (the libsodium work per report, relay against
bare forwarder; ``nodes`` runs it too) and ``availability`` (a member's round trip under
a connection flood, a delivery past a stale connection). ``python -m bench NAME --help``
for the options.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["BENCHMARKS", "main"]

BENCHMARKS = ("core", "nodes", "ceiling", "availability")


def main() -> int:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "core"
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
