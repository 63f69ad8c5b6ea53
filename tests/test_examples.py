"""Each example runs: the trio three-node script, and the asyncio client against the relay."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import nacl.pwhash
import trio

from clients.events import ReceiptEvent
from clients.node import open_node
from tests.conftest import make_trio
from tisa.arrangement import SignedArrangement

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_three_nodes_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "three_nodes.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "tokyo read from seoul: Two short-range ballistic missiles" in result.stdout
    assert "seoul got a receipt signed by tokyo" in result.stdout
    assert "tokyo verified" in result.stdout


@contextlib.contextmanager
def relay_process(tmp_path: Path) -> Iterator[int]:
    """The relay as its own process (python -m relay), on a free port."""
    arrangement, secrets = make_trio()
    signed = SignedArrangement(arrangement)
    for name, secret in secrets.items():
        signed = signed.signed_by(secret, name)
    (tmp_path / "arrangement.tisa").write_bytes(signed.encode())
    secrets["washington"].save(
        tmp_path / "relay.key",
        "pass",
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
    )
    port_file = tmp_path / "relay.port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--key",
            str(tmp_path / "relay.key"),
            "--passphrase-env",
            "RELAY_PASS",
            "--arrangement",
            str(tmp_path / "arrangement.tisa"),
            "--store",
            str(tmp_path / "relay"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        env={**os.environ, "RELAY_PASS": "pass"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_asyncio_client_receives_opens_acks_and_signs_a_receipt(tmp_path: Path) -> None:
    example = load_example("asyncio_client")
    arrangement, secrets = make_trio()
    text = b"Seoul to Tokyo, through a client that has never heard of trio."
    with relay_process(tmp_path) as port:
        relay = ("127.0.0.1", port)
        keyring = example.Keyring()
        status = asyncio.run(
            example.publish_prekeys(
                secrets["tokyo"], "tokyo", arrangement, "127.0.0.1", port, keyring, one_time=3
            )
        )
        assert status.one_time == 3 and status.signed_not_after > 0

        async def seoul_sends() -> bytes:
            async with open_node(
                secrets["seoul"], "seoul", arrangement, relay, tmp_path / "seoul"
            ) as seoul:
                with trio.fail_after(20):
                    report_id: bytes = await seoul.submit(
                        text, recipients=["tokyo"], scope="missile", level="secret"
                    )
                    await seoul.wait_stored(report_id)
                    await seoul.release(report_id, "tokyo")
                return report_id

        report_id = trio.run(seoul_sends)

        received = asyncio.run(
            asyncio.wait_for(
                example.receive_one(
                    secrets["tokyo"], "tokyo", arrangement, "127.0.0.1", port, keyring
                ),
                timeout=20,
            )
        )
        assert received.body == text
        # The one-time prekey that wrapped the key is forgotten: the signed one and two
        # unused one-time prekeys are left.
        assert len(keyring.secrets) == 1 + 2
        assert received.header.id == report_id
        assert received.header.originator == "seoul"
        assert received.header.scope == "missile"

        async def seoul_gets_receipt() -> ReceiptEvent:
            async with open_node(
                secrets["seoul"], "seoul", arrangement, relay, tmp_path / "seoul"
            ) as seoul:
                with trio.fail_after(20):
                    async for event in seoul.events():
                        if isinstance(event, ReceiptEvent):
                            return event
            raise AssertionError("no receipt")

        receipt = trio.run(seoul_gets_receipt).receipt
        assert receipt.report == report_id
        assert receipt.recipient == "tokyo"

        # The relay saw the ack: a later connection gets nothing delivered again.
        again = example.receive_one(
            secrets["tokyo"], "tokyo", arrangement, "127.0.0.1", port, keyring
        )
        with contextlib.suppress(TimeoutError):
            got = asyncio.run(asyncio.wait_for(again, timeout=1.0))
            raise AssertionError(f"delivered twice: {got}")


def test_home_folders_script_runs(tmp_path: Path) -> None:
    from tests.test_relay_cli import PASS, make_homes

    make_homes(tmp_path)
    script = str(EXAMPLES / "home_folders.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TISA_PASSPHRASE": PASS},
    )
    assert result.returncode == 0, result.stderr
    assert "tokyo read from seoul: launch detected" in result.stdout
    # Without the passphrase: one line saying what to set, status 2.
    env = {k: v for k, v in os.environ.items() if k != "TISA_PASSPHRASE"}
    bare = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=60, env=env
    )
    assert bare.returncode == 2
    assert "TISA_PASSPHRASE" in bare.stderr
