"""Coverage-guided fuzzing of every tisa decoder with atheris (libFuzzer), outside CI.

Usage::

    pip install atheris
    python fuzz/fuzz_decoders.py --list
    python fuzz/fuzz_decoders.py token --write-seeds fuzz/corpus/token
    python fuzz/fuzz_decoders.py token fuzz/corpus/token -max_total_time=3600

The first argument names a target of :mod:`tisa_testing.fuzzing`; everything after it
goes to libFuzzer (corpus directories, ``-max_total_time``, ``-jobs``, ...). A crash is
any exception the target does not allow: libFuzzer saves the input as ``crash-*``;
re-run it with ``python fuzz/fuzz_decoders.py token crash-...``.

Without atheris installed, the script runs the target once on each file or directory
given (and on the seeds when none is given): a way to replay a crash, or a smoke test.
"""

from __future__ import annotations

import pathlib
import sys


def _usage() -> None:
    from tisa_testing import fuzzing

    print(__doc__)
    print("targets:", " ".join(sorted(fuzzing.TARGETS)))


def _replay(target: object, paths: list[str]) -> int:
    from tisa_testing import fuzzing

    assert isinstance(target, fuzzing.Target)
    inputs: list[tuple[str, bytes]] = []
    for arg in paths:
        path = pathlib.Path(arg)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        inputs.extend((str(p), p.read_bytes()) for p in files)
    if not inputs:
        inputs = [(f"seed {i}", seed) for i, seed in enumerate(target.seeds())]
    for name, data in inputs:
        fuzzing.run(target, data)
        print(f"ok  {name} ({len(data)} bytes)")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in {"-h", "--help", "--list"}:
        _usage()
        return 0
    try:
        import atheris
    except ImportError:
        atheris = None

    if atheris is not None:
        with atheris.instrument_imports():
            from tisa_testing import fuzzing
    else:
        from tisa_testing import fuzzing

    name = argv[1]
    target = fuzzing.TARGETS.get(name)
    if target is None:
        print(f"unknown target {name!r}; --list shows them", file=sys.stderr)
        return 2
    rest = argv[2:]
    if len(rest) == 2 and rest[0] == "--write-seeds":
        out = pathlib.Path(rest[1])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(target.seeds()):
            (out / f"seed-{i}").write_bytes(seed)
        print(f"wrote {len(target.seeds())} seeds to {out}")
        return 0
    if atheris is None:
        print("atheris is not installed (pip install atheris): replaying inputs only")
        return _replay(target, [a for a in rest if not a.startswith("-")])

    # Build the cached fixtures (keys, seeds) before fuzzing starts, not in the first input.
    target.seeds()

    def test_one_input(data: bytes) -> None:
        fuzzing.run(target, data)

    atheris.Setup([argv[0], *rest], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
