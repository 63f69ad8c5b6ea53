"""The exchange in one script, on the home folders that the ``tisa`` command made.

Run the README's walkthrough up to step 3 (three homes: ``seoul``, ``washington``,
``tokyo``, each with ``identity.key`` and the signed ``arrangement.tisa``), then::

    TISA_PASSPHRASE=walkthrough-only python examples/home_folders.py [FOLDER]

FOLDER (default: the current folder) holds the three homes. The relay runs in this
process on a free port, with its store and the two members' stores in a fresh temporary
folder, so the homes' own stores are left alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import trio

from clients import load_home, open_node
from relay import serve


async def exchange(homes: Path, passphrase: str, stores: Path) -> str:
    """Seoul seals and holds a report, releases it to Tokyo; returns what Tokyo read."""
    washington, seoul, tokyo = (
        load_home(homes / name, passphrase) for name in ("washington", "seoul", "tokyo")
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            serve, washington.secret, washington.arrangement, stores / "relay"
        )
        relay = ("127.0.0.1", port)
        async with (
            open_node(seoul.secret, seoul.name, seoul.arrangement, relay, stores / "s") as s,
            open_node(tokyo.secret, tokyo.name, tokyo.arrangement, relay, stores / "t") as t,
        ):
            report_id = await s.submit(
                b"launch detected", recipients=["tokyo"], scope="missile", level="secret"
            )
            await s.wait_stored(report_id)
            await s.release(report_id, "tokyo")
            async for report in t.reports():
                text = report.read_body().decode()
                print(f"tokyo read from {report.originator}: {text}")
                await t.ack(report)  # taken: never handed over again
                break
        nursery.cancel_scope.cancel()
    return text


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        return 2
    passphrase = os.environ.get("TISA_PASSPHRASE")
    if not passphrase:
        print("error: set TISA_PASSPHRASE to the homes' key passphrase", file=sys.stderr)
        return 2
    homes = Path(argv[0]) if argv else Path(".")
    with tempfile.TemporaryDirectory() as stores:
        trio.run(exchange, homes, passphrase, Path(stores))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
