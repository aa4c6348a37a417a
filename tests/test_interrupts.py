"""SIGKILL training, corpus-cache writes and feature extraction at chosen and at random moments.

What must hold after every kill: nothing on disk loads as valid but wrong (checkpoints load cleanly or are
absent, temp files are never mistaken for checkpoints or cache entries), `--resume` loses at most one
epoch, and the interrupted-and-resumed run ends at exactly the weights of an uninterrupted one.

The precise kills come from a wrapper that runs the real CLI in a subprocess and SIGKILLs itself at one
chosen file write: just before the atomic rename, just after it, or half-way through writing the temp
file (the temp file is truncated, then the process dies). `epoch` says in which training epoch (-1 = the
log written at start-up); run_epoch is wrapped to know it.
"""
from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.checkpoint import list_checkpoints, load_checkpoint
from core.corpus import CaptionCache

from conftest import REPO, TINY_MODEL

KILLER = r'''
import json, os, signal, sys
spec = json.loads(os.environ.get("CS_KILL") or "null")
now = {"epoch": -1}

def hit(name):
    return spec is not None and name == spec["file"] and now["epoch"] == spec.get("epoch", -1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

_replace, _fsync = os.replace, os.fsync
def replace(src, dst, *a, **k):
    name = os.path.basename(str(dst))
    if hit(name) and spec["phase"] == "before":
        die()
    _replace(src, dst, *a, **k)
    if hit(name) and spec["phase"] == "after":
        die()
def fsync(fd):
    tmp = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if spec is not None and spec["phase"] == "mid" and tmp.startswith("." + spec["file"] + ".") \
            and now["epoch"] == spec.get("epoch", -1):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        die()
    _fsync(fd)
os.replace, os.fsync = replace, fsync

target = sys.argv[1]
if target == "train":
    import core.train as T
    _run_epoch = T.run_epoch
    def run_epoch(*a, **k):
        now["epoch"] = a[6]
        return _run_epoch(*a, **k)
    T.run_epoch = run_epoch
    sys.exit(T.main(sys.argv[2:]))
elif target == "cache":          # write cache entries forever (until killed)
    from core.corpus import CaptionCache
    cache = CaptionCache(sys.argv[2], memory=False)
    version = 0
    while True:
        for i in range(4):
            version += 1
            now["epoch"] = version
            cache.put({"kind": "captions", "i": i}, {"i": i, "version": version, "payload": [version] * 20000})
elif target == "features":
    import torch
    from core.features import main
    torch.manual_seed(0)
    sys.exit(main(sys.argv[2:]))
'''

# Starting Python + torch costs seconds on a busy 2-core box, so one "zygote" process pays the imports
# once and forks a fresh child per attempt; the children are real processes that really get SIGKILLed.
ZYGOTE = r"""
import json, os, sys
import torch, torch._dynamo                 # the slow imports (torch.optim pulls in dynamo), paid once
import core.corpus, core.features, core.train
source = compile(os.environ["CS_KILLER"], "killer", "exec")
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2), os.close(fd)
        os.environ["CS_KILL"] = json.dumps(job["kill"]) if job["kill"] else ""
        sys.argv, code = ["killer", *job["argv"]], 0
        try:
            exec(source, {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""

STATE = "train_state.safetensors"
CHECKPOINTS = ("last.safetensors", "best.safetensors")
TMP = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")       # atomic_write_bytes' temp names
DETERMINISTIC = ("epoch", "train_loss", "train_ce", "steps", "dev_bleu4", "dev_cider_d", "lr")
TIMEOUT = 60


class Zygote:
    def __init__(self, logs: Path):
        self.logs, self.jobs, self.pid, self._buffer = logs, 0, None, b""
        env = {**os.environ, "CS_KILLER": KILLER, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self._line(TIMEOUT) == "ready"

    def _line(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("no answer from the zygote")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "zygote died"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], kill: dict | None = None) -> int:
        """Fork a child running the KILLER wrapper with `argv`; returns its pid."""
        self.jobs += 1
        self.log = self.logs / f"job{self.jobs}.log"
        self.proc.stdin.write((json.dumps({"argv": argv, "kill": kill, "log": str(self.log)}) + "\n").encode())
        self.proc.stdin.flush()
        self.pid = json.loads(self._line(TIMEOUT))["pid"]
        return self.pid

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return json.loads(self._line(timeout))["rc"]
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            json.loads(self._line(TIMEOUT))
            raise

    def run(self, argv: list[str], kill: dict | None = None, timeout: float = TIMEOUT) -> tuple[int, str]:
        self.start(argv, kill)
        rc = self.wait(timeout)
        return rc, self.log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()                      # idle between jobs: nothing of it is worth a clean exit
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote-logs"))
    yield z
    z.close()


def train_args(tiny_flickr, tiny_features, out: Path) -> list[str]:
    return ["--data", str(tiny_flickr), "--features", str(tiny_features), "--out", str(out), "--epochs", "10",
            "--batch-size", "4", "--lr", "3e-3", "--min-count", "1", "--eval-beam", "1", "--seed", "7",
            "--patience", "2", "--threads", "1", "--resume", *TINY_MODEL]


def log_records(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def committed_epochs(out: Path) -> int:
    """Epochs the training state vouches for (what --resume continues after)."""
    if not (out / STATE).is_file():
        return 0
    with safe_open(str(out / STATE), framework="pt") as f:
        return json.loads(f.metadata()["state"])["counters"]["epoch"]


def assert_nothing_half_written(out: Path) -> None:
    for name in CHECKPOINTS:
        if (out / name).exists():
            load_checkpoint(out / name)                       # raises on any partial / inconsistent file
    if (out / STATE).exists():
        with safe_open(str(out / STATE), framework="pt") as f:
            assert f.metadata()["format"] == "captionscope-train-state"
        load_file(str(out / STATE))
    epochs = [r["epoch"] for r in log_records(out)]            # every line parses
    assert epochs == list(range(len(epochs)))
    known = {*CHECKPOINTS, STATE, "log.jsonl"}
    for path in out.iterdir():
        assert path.name in known or TMP.match(path.name), path.name
    # a stray temp file is hidden and ends in .tmp: never listed as a checkpoint
    assert {p.name for p in list_checkpoints(out)} <= {*CHECKPOINTS, STATE}


def test_killed_training_resumes_to_the_same_weights(zygote, tiny_flickr, tiny_features, tmp_path):
    straight = tmp_path / "straight"
    rc, log = zygote.run(["train", *train_args(tiny_flickr, tiny_features, straight)])
    assert rc == 0, log[-2000:]
    reference = log_records(straight)
    n = len(reference)
    assert 3 <= n < 10 and "early stop" in log         # the plan below also kills the stopping epoch

    out = tmp_path / "killed"
    argv = ["train", *train_args(tiny_flickr, tiny_features, out)]
    rng = random.Random(1234)
    # "at" is relative to the epoch the attempt resumes at; "random" = SIGKILL from outside after a delay
    plan = [{"file": "log.jsonl", "phase": "before", "epoch": -1},           # before anything is written
            {"file": "last.safetensors", "phase": "mid", "at": 0},           # half a temp file on disk
            {"random": rng.uniform(0.0, 0.6)},
            {"file": "last.safetensors", "phase": "after", "at": 0},         # last is ahead of the state
            {"file": "log.jsonl", "phase": "after", "at": 0},                # the log is ahead of the state
            {"random": rng.uniform(0.0, 0.6)},
            {"file": STATE, "phase": "after", "epoch": n - 1}]               # commit of the stopping epoch
    kills = 0
    for step in plan:
        start, logged_before = committed_epochs(out), len(log_records(out))
        if "random" in step:
            zygote.start(argv)
            deadline = time.time() + TIMEOUT
            while time.time() < deadline and len(log_records(out)) <= logged_before and \
                    not (out / "log.jsonl").is_file():                    # wait until training is under way
                time.sleep(0.01)
            time.sleep(step["random"])
            os.kill(zygote.pid, signal.SIGKILL)
            rc = zygote.wait()
        else:
            kill = {k: v for k, v in step.items() if k != "at"}
            if "at" in step:
                kill["epoch"] = start + step["at"]
            if kill["epoch"] >= n:
                continue
            rc, _ = zygote.run(argv, kill)
        if rc == 0:                                                   # a random kill came too late
            break
        assert rc == -signal.SIGKILL, zygote.log.read_text()[-2000:]
        kills += 1
        assert_nothing_half_written(out)
        logged, resumed_at = len(log_records(out)), committed_epochs(out)
        # at most one finished epoch is not committed (killed between its log line and the state)
        assert start <= resumed_at and logged - 1 <= resumed_at <= logged, (step, start, logged, resumed_at)
    assert kills >= 5

    rc, log = zygote.run(argv)
    assert rc == 0, log[-2000:]
    assert_nothing_half_written(out)
    got = log_records(out)
    assert [{k: r[k] for k in DETERMINISTIC} for r in got] == [{k: r[k] for k in DETERMINISTIC} for r in reference]
    for name in CHECKPOINTS:
        a, b = load_file(str(straight / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_training_kill_leaves_only_ignorable_temp_files(zygote, tiny_flickr, tiny_features, tmp_path):
    """Half-written temp files stay hidden, are never listed or loaded, and the next run removes them."""
    out = tmp_path / "run"
    args = train_args(tiny_flickr, tiny_features, out)
    rc, _ = zygote.run(["train", *args], {"file": "best.safetensors", "phase": "mid", "epoch": 0})
    assert rc == -signal.SIGKILL
    temps = [p for p in out.iterdir() if TMP.match(p.name)]
    assert [TMP.match(p.name)["target"] for p in temps] == ["best.safetensors"]
    assert temps[0].stat().st_size > 0
    assert not list_checkpoints(out) and not (out / "best.safetensors").exists()
    args[args.index("--epochs") + 1] = "1"
    rc, log = zygote.run(["train", *args])
    assert rc == 0, log[-2000:]
    assert_nothing_half_written(out)
    assert not any(p.exists() for p in temps)           # one writer per run folder: safe to clean up
    assert {p.name for p in list_checkpoints(out)} == {*CHECKPOINTS, STATE}


def test_killed_cache_writes_never_leave_a_wrong_entry(zygote, tmp_path):
    folder = tmp_path / "cache"

    def check() -> int:
        cache, found = CaptionCache(folder, memory=False), 0
        for i in range(4):
            value = cache.get(cache.make_key("captions", i=i))
            if value is not None:            # an entry is either absent or one complete, consistent write
                assert value["i"] == i and value["payload"] == [value["version"]] * 20000
                found += 1
        for path in folder.iterdir():
            assert path.name.endswith(".json") or TMP.match(path.name), path.name
        return found

    # half-way through writing version 6 (entry 1): the temp file is cut short, the entry keeps version 2
    entry = CaptionCache(folder).path_for({"kind": "captions", "i": 1}).name
    rc, _ = zygote.run(["cache", str(folder)], {"file": entry, "phase": "mid", "epoch": 6})
    assert rc == -signal.SIGKILL
    assert any(TMP.match(p.name) for p in folder.iterdir())
    assert check() == 4
    assert CaptionCache(folder).get({"kind": "captions", "i": 1})["version"] == 2
    rng = random.Random(99)
    for _ in range(3):                       # SIGKILL from outside at random moments
        zygote.start(["cache", str(folder)])
        time.sleep(0.3 + rng.uniform(0.0, 0.5))
        os.kill(zygote.pid, signal.SIGKILL)
        assert zygote.wait() == -signal.SIGKILL
        assert check() == 4
    assert CaptionCache(folder).get({"kind": "captions", "i": 1})["version"] > 2     # the writer did run


def test_feature_cache_kill_at_commit_never_pairs_old_index_with_new_data(zygote, tiny_flickr, tmp_path):
    """Re-extracting a split in another image order, killed right after the new array is renamed into
    place: the old index must not vouch for it (same shape, other rows)."""
    import shutil

    from core.errors import DataError
    from core.features import cache_paths, open_features

    other = tmp_path / "reversed"
    shutil.copytree(tiny_flickr, other)
    dev = other / "Flickr_8k.devImages.txt"
    dev.write_text("\n".join(reversed(dev.read_text().split())) + "\n")
    out = tmp_path / "features"
    base = ["--split", "dev", "--encoder-weights", "none", "--out", str(out), "--batch-size", "8", "--workers", "0"]
    rc, log = zygote.run(["features", "--data", str(tiny_flickr), *base])
    assert rc == 0, log[-2000:]
    old = open_features(out, "efficientnet_lite2", "dev")
    old_rows = {name: np.array(old.array[i]) for i, name in enumerate(old.images)}
    data_path, _ = cache_paths(out, "efficientnet_lite2", "dev")
    rc, _ = zygote.run(["features", "--data", str(other), *base], {"file": data_path.name, "phase": "after"})
    assert rc == -signal.SIGKILL
    with pytest.raises(DataError, match="no finished feature cache"):
        open_features(out, "efficientnet_lite2", "dev")
    rc, log = zygote.run(["features", "--data", str(other), *base])          # the rerun redoes it
    assert rc == 0, log[-2000:]
    store = open_features(out, "efficientnet_lite2", "dev")
    assert store.images == list(reversed(old.images))
    for i, name in enumerate(store.images):     # same random weights (seed 0): each row is its own image's
        assert np.array_equal(np.asarray(store.array[i]), old_rows[name]), name
