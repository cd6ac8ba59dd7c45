"""Run benchmarks: ``python -m benchmarks [NAME ...] [--quick]``.

Each ``benchmarks/bench_<name>.py`` defines ``async def main(args: Args) -> None``
that prints its own table(s). Without names, all of them run in turn.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sys

import benchmarks

from ._harness import Args, calibrate


def available() -> list[str]:
    return sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith("bench_")
    )


def main(argv: list[str]) -> int:
    args, names = Args.parse(argv)
    known = available()
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(known)}", file=sys.stderr)
        return 2
    print(asyncio.run(calibrate()))
    for name in names or known:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"\n# benchmark: {name}")
        asyncio.run(module.main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
