"""The whole exchange in one script: Seoul, the Washington relay and Tokyo, on trio.

Keys are generated, each member signs the arrangement separately, the relay runs in the
same process on a free port, Seoul seals and holds a report, releases it to Tokyo,
Tokyo reads it, Seoul gets the signed receipt, and both verify the audit log.

    python examples/three_nodes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from clients import ReceiptEvent, open_node
from relay import serve
from tisa.arrangement import Arrangement, Member, Role, SignedArrangement
from tisa.keys import MemberSecret


async def exchange(folder: Path) -> str:
    """Run the exchange with stores under ``folder``; returns the text Tokyo read."""
    keys = {name: MemberSecret.generate() for name in ("seoul", "washington", "tokyo")}
    both = frozenset({Role.ORIGINATOR, Role.RECIPIENT})
    draft = Arrangement(
        name="tisa-2014",
        version=1,
        members=(
            Member(name="seoul", identity=keys["seoul"].public, roles=both),
            Member(name="washington", identity=keys["washington"].public, roles={Role.RELAY}),
            Member(name="tokyo", identity=keys["tokyo"].public, roles=both),
        ),
        relay="washington",
        scopes=("missile", "nuclear"),
        levels=("confidential", "secret"),
        created=1419811200,
    )
    # Each member signs on its own; the arrangement is effective once all have.
    signed = SignedArrangement(draft)
    for name, secret in keys.items():
        signed = signed.signed_by(secret, name)
    arrangement = signed.require_effective()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, keys["washington"], arrangement, folder / "relay")
        relay = ("127.0.0.1", port)
        async with (
            open_node(keys["seoul"], "seoul", arrangement, relay, folder / "seoul") as seoul,
            open_node(keys["tokyo"], "tokyo", arrangement, relay, folder / "tokyo") as tokyo,
        ):
            # Seoul seals for Tokyo and holds: the relay stores ciphertext it cannot open.
            report_id = await seoul.submit(
                b"Two short-range ballistic missiles launched toward the East Sea.",
                recipients=["tokyo"],
                scope="missile",
                level="secret",
            )
            await seoul.wait_stored(report_id)
            # Seoul approves: a release token for Tokyo, checked and consumed by the relay.
            await seoul.release(report_id, "tokyo")
            async for report in tokyo.reports():
                text = report.read_body().decode()
                print(f"tokyo read from {report.originator}: {text}")
                await tokyo.ack(report)  # taken: never handed over again
                break
            async for event in seoul.events():
                if isinstance(event, ReceiptEvent):
                    print(f"seoul got a receipt signed by {event.receipt.recipient}")
                    break
            for node in (seoul, tokyo):
                entries = await node.fetch_audit()
                print(f"{node.name} verified {len(entries)} audit entries")
        nursery.cancel_scope.cancel()
    return text


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        trio.run(exchange, Path(folder))


if __name__ == "__main__":
    main()
