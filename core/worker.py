"""Corpus jobs in a separate, low-priority process, so one session's heavy work never starves another's.

Captioning and scoring a whole split keeps both CPU cores busy for seconds. Run inside the dashboard's server
process it would also hold the GIL and OpenMP threads that every other session's interactive caption needs.
`CorpusWorker` starts `python -m core.worker` once, under Linux's SCHED_IDLE policy (it runs only on CPU
time nothing else wants; a normal thread that wakes up preempts it at once) and at `nice +10` (the fallback
where SCHED_IDLE is refused: the kernel then gives interactive work ~90 % of the CPU), sends it one job at a
time over stdin, and reads JSON events back:
{"progress": [done, total]}, then {"done": summary} or {"error": "one line"}. The worker writes its
results to the same on-disk `core.corpus.CaptionCache` the caller reads, so the caller simply looks them up
when the job is done. Identical requests share one job; others wait in a queue.

    worker = CorpusWorker()
    job = worker.submit(CorpusJob(checkpoint, data_dir, "dev", decoding.to_dict(), cache_dir=...))
    while not job.wait(0.2):
        show(job.progress)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.errors import CaptionScopeError

WORKER_NICE = 10
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CorpusJob:
    """Caption (and score) `split` of the dataset at `data_dir` with each decoding setting."""
    checkpoint: str
    data_dir: str
    split: str
    decodings: tuple[str, ...]             # canonical JSON of each DecodingConfig.to_dict()
    cache_dir: str
    features_dir: str | None = None
    limit: int = 0                         # first n images (0 = all)
    score: bool = True
    with_meteor: bool = True
    encoder_weights: str | None = None

    @staticmethod
    def encode_decoding(decoding: dict) -> str:
        return json.dumps(decoding, sort_keys=True)


@dataclass
class JobState:
    job: CorpusJob
    progress: tuple[int, int] = (0, 0)
    summary: dict | None = None
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def result(self) -> dict:
        """The summary; raises CaptionScopeError with the worker's message if the job failed."""
        self.finished.wait()
        if self.error is not None:
            raise CaptionScopeError(self.error)
        return self.summary or {}


class CorpusWorker:
    """Client side: one worker process, one job at a time, restarted if it dies."""

    def __init__(self, nice: int = WORKER_NICE, idle: bool = True):
        self.nice, self.idle = nice, idle
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._queue: list[JobState] = []
        self._running: JobState | None = None
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the process now (it imports torch while nothing waits on it)."""
        with self._lock:
            self._ensure_process()

    def submit(self, job: CorpusJob) -> JobState:
        with self._lock:
            for state in ([self._running] if self._running else []) + self._queue:
                if state.job == job:
                    return state
            state = JobState(job)
            self._queue.append(state)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="captionscope-corpus-worker", daemon=True)
                self._thread.start()
            self._wake.notify_all()
            return state

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            self._proc = None

    # -- internals ---------------------------------------------------------------------------------------
    def _ensure_process(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "core.worker", "--nice", str(self.nice), *(["--idle"] * self.idle)],
                cwd=REPO_ROOT, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self._proc

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if not self._wake.wait(timeout=60):
                        self._thread = None
                        return
                state = self._running = self._queue.pop(0)
                proc = self._ensure_process()
            try:
                self._run_one(proc, state)
            except (OSError, ValueError) as e:     # the process died or wrote garbage: fail this job only
                state.error = f"corpus worker failed ({type(e).__name__}: {e})"
                self.close()
            finally:
                with self._lock:
                    self._running = None
                state.finished.set()

    @staticmethod
    def _run_one(proc: subprocess.Popen, state: JobState) -> None:
        proc.stdin.write(json.dumps(asdict(state.job)) + "\n")
        proc.stdin.flush()
        while True:
            line = proc.stdout.readline()
            if not line:
                raise OSError("the worker process exited")
            event = json.loads(line)
            if "progress" in event:
                state.progress = tuple(event["progress"])
            elif "error" in event:
                state.error = str(event["error"])
                return
            elif "done" in event:
                state.summary = event["done"]
                return


# -- the worker process --------------------------------------------------------------------------------

_events = sys.stdout      # replaced in main() by a private copy of fd 1


def _emit(event: dict) -> None:
    _events.write(json.dumps(event) + "\n")
    _events.flush()


def run_job(job: CorpusJob, loaded: dict) -> dict:
    """Caption and score in this process; results land in the job's CaptionCache. Returns a summary."""
    from core import corpus
    from core.captioner import Captioner
    from core.data import load_dataset
    from core.decoding import DecodingConfig
    from core.metrics import prestart_meteor

    key = (job.checkpoint, job.encoder_weights)
    if loaded.get("captioner_key") != key:
        loaded["captioner"] = Captioner.from_checkpoint(job.checkpoint, encoder_weights=job.encoder_weights)
        loaded["captioner_key"] = key
    if loaded.get("data_key") != job.data_dir:
        loaded["dataset"], loaded["data_key"] = load_dataset(job.data_dir), job.data_dir
    captioner, items = loaded["captioner"], loaded["dataset"].split(job.split)
    items = items[: job.limit] if job.limit else items
    cache = corpus.CaptionCache(job.cache_dir)
    configs = [DecodingConfig.from_dict(json.loads(d)) for d in job.decodings]
    total = len(items) * len(configs)
    if job.score and job.with_meteor:
        prestart_meteor()          # the JVM loads its tables while the encoder runs
    summary = {"images": len(items), "runs": []}
    for k, config in enumerate(configs):
        run = corpus.caption_split(captioner, items, config, features_dir=job.features_dir, split=job.split,
                                   cache=cache,
                                   progress=lambda d, t, k=k: _emit({"progress": [k * len(items) + d, total]}))
        if job.score:
            corpus.score_split(run.captions, items, with_meteor=job.with_meteor, cache=cache)
        summary["runs"].append({"decode_s": run.decode_s, "source": run.source})
    return summary


def lower_to_idle_policy() -> bool:
    """SCHED_IDLE for this thread and every thread it starts later (OpenMP's, the METEOR JVM): call it before
    torch is imported. Lowering one's own policy needs no privilege; False where the OS refuses it."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        return False


def main() -> int:
    if "--nice" in sys.argv:
        try:
            os.nice(int(sys.argv[sys.argv.index("--nice") + 1]))
        except (OSError, ValueError, IndexError):
            pass
    if "--idle" in sys.argv:
        lower_to_idle_policy()
    global _events
    # events get fd 1 to themselves; anything else that prints (libraries, the JVM) goes to stderr
    _events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import core  # noqa: F401  (OpenMP spin policy, before torch)
    loaded: dict = {}
    for line in sys.stdin:
        try:
            job = CorpusJob(**{**json.loads(line), "decodings": tuple(json.loads(line)["decodings"])})
            _emit({"done": run_job(job, loaded)})
        except CaptionScopeError as e:
            _emit({"error": str(e).splitlines()[0]})
        except Exception as e:  # noqa: BLE001 - report any failure as one line; the worker keeps serving
            _emit({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
