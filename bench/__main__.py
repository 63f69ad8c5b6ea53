"""``python -m bench [NAME] [ARGS]``: run one benchmark (default: core)."""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "core"
    module = importlib.import_module(f"bench.{name}")
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
