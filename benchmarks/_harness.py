"""Side-by-side measurement: every variant in one process, interleaved, ratios paired per round.

The machines this runs on are noisy (absolute figures move by up to 2x from
minute to minute), so nothing here is judged on an absolute time. Each round
runs every variant once, in an order rotated per round; a variant's ratio to
the reference is computed within each round and the median of those paired
ratios is reported with its range.

Two shapes of measurement:

:func:`micro`
    a no-I/O operation timed over ``number`` calls per repeat: median µs/op.
:func:`throughput`
    an I/O operation run for a fixed time per round: ops/s and client CPU µs/op
    (CPU per op is much less sensitive to noise than ops/s).

Usage in a benchmark module (``benchmarks/bench_<topic>.py``)::

    async def main(args: Args) -> None:
        table = await micro([Variant("ref", ref_op), Variant("ours", our_op)], reference="ref")
        table.print("scope overhead", targets={"ours": Target("ratio", "<=", 0.7)})

``python -m benchmarks`` runs every module; ``python -m benchmarks scope guard`` a selection.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ANCHOR_EMPTY_AWAIT_US",
    "FINE",
    "Args",
    "Row",
    "Table",
    "Target",
    "Variant",
    "calibrate",
    "micro",
    "paired_rows",
    "rotations",
    "throughput",
]

Op = Callable[[], Awaitable[object]]

#: I/O throughput targets of a few percent are below this machine's noise over a
#: second; slicing the same total time into FINE-times more, shorter rounds pairs
#: the variants more closely (both see the same background load).
FINE = 4
#: perf-anchors.md, "baseline: await of an empty coroutine" on the anchor box (µs).
ANCHOR_EMPTY_AWAIT_US = 0.088


@dataclass
class Args:
    """Options shared by all benchmarks (``python -m benchmarks --help``)."""

    quick: bool = False
    rounds: int = 11
    seconds: float = 1.0

    @classmethod
    def parse(cls, argv: Sequence[str]) -> tuple[Args, list[str]]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks")
        parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
        parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
        parser.add_argument("--rounds", type=int, default=None)
        parser.add_argument("--seconds", type=float, default=None)
        ns = parser.parse_args(argv)
        args = cls(quick=ns.quick)
        if ns.quick:
            args.rounds, args.seconds = 3, 0.4
        if ns.rounds is not None:
            args.rounds = ns.rounds
        if ns.seconds is not None:
            args.seconds = ns.seconds
        return args, list(ns.names)


@dataclass
class Variant:
    """One contender: ``op`` performs one operation."""

    name: str
    op: Op


@dataclass
class Target:
    """A goal for one row: ``metric`` (``"us"``, ``"ratio"``, ``"cpu_ratio"``) compared to ``value``."""

    metric: Literal["us", "ratio", "cpu_ratio"]
    op: Literal["<=", ">="]
    value: float

    def check(self, row: Row) -> str:
        actual = {"us": row.us_per_op, "ratio": row.ratio, "cpu_ratio": row.cpu_ratio}[self.metric]
        if actual is None:
            return "n/a"
        ok = actual <= self.value if self.op == "<=" else actual >= self.value
        label = {"us": "µs/op", "ratio": "ratio", "cpu_ratio": "CPU ratio"}[self.metric]
        return f"{'MET' if ok else 'MISSED'} ({label} {self.op} {self.value:g})"


@dataclass
class Row:
    name: str
    us_per_op: float
    us_range: tuple[float, float]
    ops_per_s: float | None = None
    cpu_us_per_op: float | None = None
    ratio: float | None = None
    ratio_range: tuple[float, float] | None = None
    cpu_ratio: float | None = None
    #: the paired ratios of every round, of which ``ratio`` and ``cpu_ratio`` are the medians
    ratios: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)


@dataclass
class Table:
    rows: list[Row]
    reference: str
    kind: str
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def print(self, title: str, targets: dict[str, Target] | None = None) -> None:
        targets = targets or {}
        print(f"\n## {title}  ({self.kind}; ratios paired per round against {self.reference!r})")
        header = ["variant", "µs/op median [min-max]"]
        if self.kind.startswith("throughput"):
            header += ["ops/s", "client CPU µs/op"]
        header += ["ratio (speed vs ref)", "CPU ratio", "target"]
        lines = [header]
        for r in self.rows:
            line = [r.name, f"{r.us_per_op:.3f} [{r.us_range[0]:.3f}-{r.us_range[1]:.3f}]"]
            if self.kind.startswith("throughput"):
                line += [f"{r.ops_per_s:,.0f}", f"{r.cpu_us_per_op:.1f}"]
            if r.ratio is not None and r.ratio_range is not None:
                line.append(f"{r.ratio:.3f} [{r.ratio_range[0]:.3f}-{r.ratio_range[1]:.3f}]")
            else:
                line.append("-")
            line.append(f"{r.cpu_ratio:.3f}" if r.cpu_ratio is not None else "-")
            target = targets.get(r.name)
            line.append(target.check(r) if target else "")
            lines.append(line)
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        for index, line in enumerate(lines):
            print(
                "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
            )
            if index == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for note in self.notes:
            print(f"  note: {note}")


def _median_range(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(values), (min(values), max(values))


def rotations(count: int, rounds: int) -> list[list[int]]:
    """The order of ``count`` variants in each of ``rounds`` rounds: rotated by one per round."""
    return [[(start + i) % count for i in range(count)] for start in range(rounds)]


def paired_rows(
    names: Sequence[str],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    reference: str,
) -> list[Row]:
    """Throughput rows from each round's ops/s and client CPU µs/op, paired per round."""
    rows = []
    for name in names:
        us_median, us_spread = _median_range([1e6 / r for r in rates[name]])
        ratios = [r / ref for r, ref in zip(rates[name], rates[reference], strict=True)]
        ratio, ratio_range = _median_range(ratios)
        cpu_ratios = [c / ref for c, ref in zip(cpu[name], cpu[reference], strict=True)]
        rows.append(
            Row(
                name,
                us_median,
                us_spread,
                ops_per_s=statistics.median(rates[name]),
                cpu_us_per_op=statistics.median(cpu[name]),
                ratio=ratio,
                ratio_range=ratio_range,
                cpu_ratio=statistics.median(cpu_ratios),
                ratios=ratios,
                cpu_ratios=cpu_ratios,
            )
        )
    return rows


async def micro(
    variants: Sequence[Variant],
    *,
    reference: str,
    number: int = 20_000,
    repeats: int = 9,
) -> Table:
    """Time no-I/O operations: ``number`` calls per repeat, every variant per repeat."""
    per_variant: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up
        for _ in range(min(number // 10, 2000)):
            await v.op()
    for order in rotations(len(variants), repeats):
        for index in order:
            v = variants[index]
            op = v.op
            gc.collect()
            start = time.perf_counter()
            for _ in range(number):
                await op()
            per_variant[v.name].append((time.perf_counter() - start) / number * 1e6)
    rows = []
    ref = per_variant[reference]
    for v in variants:
        times = per_variant[v.name]
        median, spread = _median_range(times)
        # speed ratio = time(ref) / time(variant) < 1 means slower; for costs we
        # report the cost ratio variant/ref instead (lower is better), clearly labelled.
        ratios = [t / r for t, r in zip(times, ref, strict=True)]
        ratio, ratio_range = _median_range(ratios)
        rows.append(
            Row(v.name, median, spread, ratio=ratio, ratio_range=ratio_range, ratios=ratios)
        )
    table = Table(rows, reference, "micro: cost ratio = µs(variant) / µs(reference)")
    return table


async def throughput(
    variants: Sequence[Variant],
    *,
    reference: str,
    rounds: int = 7,
    seconds: float = 1.0,
    warmup: float = 0.2,
    concurrency: int = 1,
) -> Table:
    """Run I/O operations for ``seconds`` per variant per round (``concurrency`` tasks each)."""
    import asyncio

    ops: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}

    async def run_for(op: Op, duration: float) -> tuple[int, float, float]:
        count = 0
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                await op()
                count += 1

        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count, time.perf_counter() - wall_start, time.process_time() - cpu_start

    for v in variants:
        await run_for(v.op, warmup)
    for order in rotations(len(variants), rounds):
        for index in order:
            v = variants[index]
            gc.collect()
            count, wall, cpu_time = await run_for(v.op, seconds)
            ops[v.name].append(count / wall)
            cpu[v.name].append(cpu_time / max(count, 1) * 1e6)
    rows = paired_rows([v.name for v in variants], ops, cpu, reference)
    return Table(
        rows,
        reference,
        f"throughput x{concurrency}: ratio = ops/s(variant) / ops/s(reference); "
        "CPU ratio = client CPU µs/op(variant) / (reference)",
    )


async def calibrate() -> str:
    """Describe this machine's speed now against the anchor box (perf-anchors.md)."""

    async def empty() -> None:
        return None

    number = 200_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            await empty()
        best = min(best, (time.perf_counter() - start) / number * 1e6)
    anchor = ANCHOR_EMPTY_AWAIT_US
    return (
        f"calibration: await of an empty coroutine = {best:.3f} µs "
        f"(anchor box: {anchor} µs; this machine is {best / anchor:.2f}x the anchor's cost now)"
    )
