"""``python -m relay``: the relay's command line, the same command as ``tisa relay run``.

See :mod:`relay.cli` for the options and exit status (``python -m relay --help``).
"""

from __future__ import annotations

from relay.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
