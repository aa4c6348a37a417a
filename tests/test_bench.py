"""`python -m bench --quick --synthetic` runs end to end and prints one ratio line per benchmark.
(No timing is asserted: this is a smoke test of the suite, not a measurement.)"""
import os
import subprocess
import sys

from conftest import REPO

BENCHES = ("decoding", "upload", "features", "train_step", "dashboard", "first_visit", "faithfulness", "grid")


def test_quick_bench_prints_every_benchmarks_ratio_line():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--synthetic", "--workers", "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("bench ", 1)[-1]
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.split() and line.split()[0] in BENCHES}
    assert set(rows) == set(BENCHES), done.stdout[-3000:]
    for name in ("decoding", "upload", "features", "train_step", "first_visit", "faithfulness"):
        assert "failed" not in rows[name] and "x " in rows[name] + " ", rows[name]   # a measured ratio, e.g. 7.31x
    assert "skipped" in rows["dashboard"]                                           # --quick skips the browser
    assert "skipped" in rows["grid"]                             # the grid needs the real checkpoint and dev split
    assert "identical captions 8/8" in done.stdout


def test_median_of_runs_takes_the_middle_run_per_figure():
    from bench.common import Row, median_rows

    def run(ratio: float, latency_ms: float) -> list[Row]:
        return [Row("features", "images/s", f"{ratio * 70:.1f} img/s", "70 img/s", ratio, ">= 2x", ratio >= 2),
                Row("upload", "p50", f"{latency_ms:.0f} ms", "60 ms naive", 60 / latency_ms, "p50 <= 100 ms",
                    latency_ms <= 100)]

    features, upload = median_rows([run(1.4, 40), run(2.3, 120), run(2.1, 45)])
    assert features.ratio == 2.1 and features.ok == "2/3"            # the middle ratio, not the mean 1.93
    assert upload.value == "45 ms" and upload.ok == "2/3"            # latency targets: the middle value
    assert "range 1.40 to 2.30" in features.notes[-1]
