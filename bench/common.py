"""Timing helpers and the result table shared by every benchmark.

Each benchmark measures a figure and its baseline *in the same run* (machines are noisy; only ratios
measured side by side mean something), repeats both and reports medians.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "captionscope-lite2.safetensors"
DEFAULT_FEATURES = REPO / "features"
DEFAULT_DATA = Path("/work/shared/flickr8k")
EXAMPLES = REPO / "assets" / "examples"


@dataclass
class Row:
    """One line of the table: `value` beside `baseline`, their ratio, and whether the target is met."""
    bench: str
    figure: str
    value: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None
    notes: list[str] = field(default_factory=list)

    def judged(self) -> float:
        """The number the target is about: the ratio for ratio targets ("8x", "of peak"), else the value."""
        if self.ratio is not None and ("x" in self.target or "peak" in self.target or self.target == "-"):
            return self.ratio
        number = re.match(r"\s*([0-9.]+)", self.value)
        return float(number.group(1)) if number else float("nan")


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Per figure, the row of the run with the median judged number; `ok` becomes "k/N" runs that met the
    target. Runs are whole `python -m bench` processes (on these machines a process can land in a slow or a
    fast mode as a whole, which repeats inside one run cannot show)."""
    merged = []
    for rows in zip(*runs):
        ordered = sorted(rows, key=Row.judged)
        mid = ordered[(len(ordered) - 1) // 2]
        ok = "-" if all(r.ok is None for r in rows) else f"{sum(bool(r.ok) for r in rows)}/{len(rows)}"
        low, high = ordered[0].judged(), ordered[-1].judged()
        merged.append(replace(mid, ok=ok, notes=mid.notes + [f"median of {len(rows)} runs: range {low:.2f} to {high:.2f}"]))
    return merged


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """Median wall time (s) of `repeats` calls after `warmup` untimed ones; also returns all samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, run alternately (A B A B ...) so background load hits both alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def print_table(rows: list[Row]) -> str:
    """The table `python -m bench` prints: every benchmark has one `ratio` line per figure."""
    head = ("bench", "figure", "value", "baseline", "ratio", "target", "ok")
    body = [(r.bench, r.figure, r.value, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}x",
             r.target, r.ok if isinstance(r.ok, str) else {True: "yes", False: "NO", None: "-"}[r.ok]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    notes = [f"  [{r.bench}] {n}" for r in rows for n in r.notes]
    text = "\n".join(out + (["", "notes:"] + notes if notes else []))
    print(text, flush=True)
    return text
