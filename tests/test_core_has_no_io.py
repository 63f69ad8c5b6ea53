"""The protocol core does no I/O: importing any module of ``tisa`` loads neither trio,
nor socket, nor asyncio, so a client on any event loop can embed it.

Modules are found by walking the package, so a new module is covered without editing
this file. The harness (``tisa_testing``) is a package of its own, above the nodes.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tisa

FORBIDDEN = ("trio", "socket", "asyncio")
EXEMPT: set[str] = set()


def core_modules() -> list[str]:
    """Every module under ``tisa``, found without importing any of them."""
    names = ["tisa"]

    def walk(paths: list[str], prefix: str) -> None:
        for info in pkgutil.iter_modules(paths, prefix):
            if any(info.name == e or info.name.startswith(e + ".") for e in EXEMPT):
                continue
            names.append(info.name)
            if info.ispkg:
                leaf = info.name.rsplit(".", 1)[1]
                walk([str(Path(p) / leaf) for p in paths], info.name + ".")

    walk(list(tisa.__path__), "tisa.")
    return sorted(names)


def test_the_walk_finds_the_core() -> None:
    found = core_modules()
    for name in ("tisa.encoding", "tisa.keys", "tisa.arrangement", "tisa.errors"):
        assert name in found


CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
loaded = sorted(
    name for name in sys.modules
    if any(name == bad or name.startswith(bad + ".") for bad in sys.argv[2:])
)
print(" ".join(loaded))
"""


@pytest.mark.parametrize("module", core_modules())
def test_importing_loads_no_io(module: str) -> None:
    # A fresh interpreter: this one has loaded trio already, for pytest-trio.
    result = subprocess.run(
        [sys.executable, "-c", CHECK, module, *FORBIDDEN],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [], f"importing {module} loads {result.stdout.strip()}"
