"""`python -m bench --quick --synthetic` runs end to end and prints one ratio line per benchmark.
(No timing is asserted: this is a smoke test of the suite, not a measurement.)"""
import os
import subprocess
import sys

from conftest import REPO

BENCHES = ("decoding", "upload", "features", "train_step", "dashboard")


def test_quick_bench_prints_every_benchmarks_ratio_line():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--synthetic", "--workers", "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("bench ", 1)[-1]
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.split() and line.split()[0] in BENCHES}
    assert set(rows) == set(BENCHES), done.stdout[-3000:]
    for name in ("decoding", "upload", "features", "train_step"):
        assert "failed" not in rows[name] and "x " in rows[name] + " ", rows[name]   # a measured ratio, e.g. 7.31x
    assert "skipped" in rows["dashboard"]                                           # --quick skips the browser
    assert "identical captions 8/8" in done.stdout
