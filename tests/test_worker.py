"""core.worker: corpus jobs run in a separate low-priority process and land in the shared on-disk cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core import corpus
from core.captioner import Captioner
from core.data import load_dataset
from core.decoding import DecodingConfig
from core.worker import WORKER_NICE, CorpusJob, CorpusWorker


def _nice_of(pid: int) -> int:
    # /proc/PID/stat: field 19 is the nice value (after the parenthesised command name)
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _idle_policy_allowed() -> bool:
    probe = "from core.worker import lower_to_idle_policy; print(lower_to_idle_policy())"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip() == "True"


def test_job_runs_at_low_priority_and_fills_the_callers_cache(tiny_checkpoint, tiny_flickr, tmp_path):
    configs = [DecodingConfig(beam_size=1), DecodingConfig(beam_size=2, num_return_sequences=1)]
    job = CorpusJob(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_flickr), split="dev",
                    decodings=tuple(CorpusJob.encode_decoding(c.to_dict()) for c in configs),
                    cache_dir=str(tmp_path / "cache"), limit=5, with_meteor=False)
    worker = CorpusWorker()
    try:
        first, again = worker.submit(job), worker.submit(job)
        assert first is again                                    # identical requests share one job
        summary = first.result()
        assert summary["images"] == 5 and len(summary["runs"]) == 2
        assert first.progress == (10, 10)
        assert _nice_of(worker._proc.pid) >= WORKER_NICE
        if _idle_policy_allowed():                               # and it only takes CPU nothing else wants
            assert os.sched_getscheduler(worker._proc.pid) == os.SCHED_IDLE
        captioner = Captioner.from_checkpoint(tiny_checkpoint)
        items = load_dataset(tiny_flickr).split("dev")[:5]
        cache = corpus.CaptionCache(tmp_path / "cache")
        for config in configs:
            assert corpus.split_is_cached(captioner, items, config, "dev", cache)
            here = corpus.caption_split(captioner, items, config, features_dir=None, split="dev").captions
            assert corpus.caption_split(captioner, items, config, cache=cache, split="dev").captions == here
        # a failing job reports one line and the worker keeps serving
        bad = worker.submit(CorpusJob(**{**job.__dict__, "checkpoint": str(tmp_path / "nope.safetensors")}))
        bad.wait(120)
        assert bad.error and "nope.safetensors" in bad.error and "\n" not in bad.error
        assert worker.submit(job).result()["images"] == 5
    finally:
        worker.close()
