"""Self-critical sequence training (Rennie et al., 2017): fine-tune a cross-entropy model on CIDEr-D itself.

    python -m core.scst --init runs/lite2-a/best.safetensors --data ../shared/flickr8k --out runs/lite2-scst
    python -m core.scst ... --resume                                                 # after a kill

Teacher forcing never lets the model see its own mistakes and optimises word likelihood, not the metric.
SCST treats the decoder as a policy: per image it samples k captions y^s from the model, decodes the greedy
caption y^g (no gradient) and follows the REINFORCE gradient of

    loss = -mean_s (r(y^s) - r(y^g)) * sum_t log p(y^s_t)          (tokens up to and incl. <end>)

with r = CIDEr-D against the image's references. The greedy caption is the baseline: samples better than
what the model would say at test time are reinforced, worse ones suppressed, with no learned critic.

CIDEr-D's idf is taken once from the *training* references (as in the public SCST code): per-batch idf over
50 images would make the reward of the same caption jump from batch to batch. Dropout is off while sampling
(`--keep-dropout` turns it on): the policy being improved is then exactly the one that is greedy/beam decoded.
Every `--eval-every-steps` (default: once per epoch) the dev split is beam-decoded and scored, one JSONL line
is appended to OUT/log.jsonl (which starts with the init run's cross-entropy lines, phase "xe"), and
last/best checkpoints + train_state are written atomically. best.safetensors starts as the init model, so it
is never worse on dev than where SCST started. A kill loses at most the steps since the last evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from core.checkpoint import load_checkpoint, save_checkpoint
from core.cli import add_config_arguments
from core.corpus import decode_store, score_split
from core.data import load_dataset
from core.decoding import DecodingConfig, greedy
from core.errors import ConfigError, cli_main
from core.encoders import build_trained_encoder
from core.features import model_features
from core.io_utils import atomic_write_text
from core.metrics import simple_tokenize
from core.model import ShowAttendTell
from core.text import END_ID, NEVER_GENERATED_IDS, PAD_ID, START_ID, Vocabulary
from core.train_state import load_train_state, save_train_state


# -- reward: pycocoevalcap's CIDEr-D with a fixed (training-set) idf ----------------------------------------

class _FixedDocumentFrequency(dict):
    """df table that answers 0 for unseen n-grams without growing (CiderScorer indexes it like a defaultdict)."""
    def __missing__(self, key):
        return 0.0


class _FixedIdfCiderScorer(CiderScorer):
    """pycocoevalcap's CiderScorer, with document_frequency and ref_len fixed from outside.

    `compute_cider` assigns ref_len = log(#images scored); the property ignores that assignment so the
    toolkit's own n-gram, clipping and length-penalty code runs unchanged with the corpus-level value.
    """
    def __init__(self, document_frequency: dict, ref_len: float, n: int = 4, sigma: float = 6.0):
        super().__init__(n=n, sigma=sigma)
        self.document_frequency, self._ref_len = document_frequency, ref_len

    ref_len = property(lambda self: self._ref_len, lambda self, value: None)


def sentence_bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """pycocoevalcap's per-sentence BLEU-4 ("closest" reference length) of each candidate."""
    scorer = BleuScorer(n=4)
    for caption, refs in zip(candidates, references, strict=True):
        scorer += (" ".join(simple_tokenize(caption)), [" ".join(simple_tokenize(r)) for r in refs])
    _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_sentence[3], dtype=np.float64)


class CiderDReward:
    """CIDEr-D of candidate captions against the references of their image, idf from `references` (all images)."""

    def __init__(self, references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0,
                 bleu_weight: float = 0.0):
        if not references:
            raise ConfigError("CIDEr-D reward needs at least one image with references")
        self.n, self.sigma, self.bleu_weight, self.references = n, sigma, bleu_weight, references
        self.crefs = {key: cook_refs([simple_tokenize(c) for c in caps], n) for key, caps in references.items()}
        df: dict = defaultdict(float)
        for refs in self.crefs.values():           # same counting as CiderScorer.compute_doc_freq
            for ngram in {g for ref in refs for g in ref}:
                df[ngram] += 1
        self.document_frequency = _FixedDocumentFrequency(df)
        self.ref_len = float(np.log(float(len(self.crefs))))

    def __call__(self, candidates: Sequence[str], images: Sequence[str]) -> np.ndarray:
        """One CIDEr-D per candidate; candidates[i] is scored against the references of images[i]."""
        scorer = _FixedIdfCiderScorer(self.document_frequency, self.ref_len, self.n, self.sigma)
        for caption, image in zip(candidates, images, strict=True):
            scorer.crefs.append(self.crefs[image])
            scorer.ctest.append(cook_test(simple_tokenize(caption), self.n))
        cider = np.asarray(scorer.compute_cider(), dtype=np.float64)
        if not self.bleu_weight:
            return cider
        return cider + self.bleu_weight * sentence_bleu4(candidates, [self.references[im] for im in images])


# -- sampling with gradients -------------------------------------------------------------------------------

def sample_captions(model: ShowAttendTell, features: torch.Tensor, max_length: int, *, generator: torch.Generator,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial samples (R, T) (pad after <end>) and the summed log-prob of each (R,), with autograd."""
    R = features.shape[0]
    state = model.init_state(features)
    tokens = torch.full((R,), START_ID, dtype=torch.long)
    done = torch.zeros(R, dtype=torch.bool)
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    banned[list(NEVER_GENERATED_IDS)] = True
    total, emitted = features.new_zeros(R, dtype=torch.float32), []
    for _ in range(max_length):
        logits, _, _, state = model.step(tokens, state)
        logp = F.log_softmax(logits.float().masked_fill(banned, float("-inf")), dim=1)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
        drawn = torch.where(done, torch.full_like(drawn, END_ID), drawn)   # finished rows: ignored below
        total = total + torch.where(done, 0.0, logp.gather(1, drawn[:, None]).squeeze(1))
        emitted.append(torch.where(done, PAD_ID, drawn))
        done = done | (drawn == END_ID)
        tokens = drawn
        if bool(done.all()):
            break
    return torch.stack(emitted, 1), total


@dataclass
class ScstConfig:
    init: str = ""
    data: str = ""
    features: str = "features"
    out: str = "runs/lite2-scst"
    epochs: int = 3
    batch_size: int = 50          # images per step
    samples: int = 5              # sampled captions per image (all share the image's greedy baseline)
    baseline: str = "greedy"      # greedy (Rennie et al.) | mean: the image's other samples (Luo 2020)
    lr: float = 2e-5
    grad_clip: float = 1.0
    max_length: int = 16          # sampled tokens incl. <end>
    keep_dropout: bool = False
    precision: str = "bf16"
    eval_beam: int = 3
    eval_limit: int = 0
    eval_every_steps: int = 0     # 0 = once per epoch
    bleu_weight: float = 0.0      # reward = CIDEr-D + w * sentence BLEU-4: w > 0 favours n-gram precision of
                                  # longer phrases, which CIDEr-D alone trades for shorter captions
    max_steps: int = 0
    keep_snapshots: bool = False  # also keep OUT/step-NNNNN.safetensors at every evaluation, for core.average
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.baseline not in ("greedy", "mean"):
            raise ConfigError(f"--baseline must be greedy or mean, got {self.baseline!r}")
        if min(self.batch_size, self.samples, self.epochs, self.max_length) < 1 \
                or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError("--batch-size, --samples, --epochs and --max-length must be >= 1 and --lr > 0")
        if min(self.max_steps, self.eval_every_steps, self.eval_limit) < 0:
            raise ConfigError("--max-steps, --eval-every-steps and --eval-limit must be >= 0")
        if not math.isfinite(self.bleu_weight) or self.bleu_weight < 0:
            raise ConfigError(f"--bleu-weight must be a finite number >= 0, got {self.bleu_weight}")


def scst_step(model: ShowAttendTell, optimizer: torch.optim.Optimizer, reward: CiderDReward, vocab: Vocabulary,
              feats: torch.Tensor, images: list[str], cfg: ScstConfig, generator: torch.Generator) -> dict:
    """One policy-gradient update on a batch of images; returns loss and mean rewards."""
    k = cfg.samples
    greedy_hyps = greedy(model, feats, DecodingConfig(beam_size=1, max_length=cfg.max_length))
    greedy_caps = [vocab.decode(h[0].token_ids) for h in greedy_hyps]
    model.train(cfg.keep_dropout)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        tokens, logprob = sample_captions(model, feats.repeat_interleave(k, dim=0), cfg.max_length,
                                          generator=generator)
    sampled_caps = [vocab.decode(row) for row in tokens.tolist()]
    rows = [im for im in images for _ in range(k)]
    scores = reward(sampled_caps + greedy_caps, rows + list(images))
    r_sample, r_greedy = scores[:len(rows)], scores[len(rows):]
    if cfg.baseline == "mean" and k > 1:    # leave-one-out mean of the image's other samples
        per_image = r_sample.reshape(-1, k)
        base = ((per_image.sum(1, keepdims=True) - per_image) / (k - 1)).reshape(-1)
    else:
        base = np.repeat(r_greedy, k)
    advantage = torch.from_numpy(r_sample - base).float()
    loss = -(advantage * logprob).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "reward_sample": float(r_sample.mean()), "reward_greedy": float(r_greedy.mean())}


def _init_log_lines(init_path: Path, training: dict) -> list[str]:
    """The init run's cross-entropy log lines (up to the init checkpoint's epoch), tagged phase "xe"."""
    log = init_path.parent / str(training.get("log", "log.jsonl"))
    last_epoch = training.get("epoch", math.inf)
    lines = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line) if line.strip() else None
        if isinstance(record, dict) and record.get("epoch", math.inf) <= last_epoch:
            lines.append(json.dumps({**record, "phase": record.get("phase", "xe")}))
    return lines


@dataclass
class _ScstRun:
    """One SCST run's fixed parts: the init checkpoint, data, reward, files; and what it does with them."""
    cfg: ScstConfig
    resume: bool

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.init = load_checkpoint(cfg.init)
        self.model, self.vocab = self.init.model, self.init.vocab
        dataset = load_dataset(cfg.data)
        self.train_items, dev_items = dataset.split("train"), dataset.split("dev")
        # a fine-tuned encoder tail is run (frozen) over the cache of activations that enter it
        init = self.init
        tail = build_trained_encoder(init.encoder, init.encoder_state, "none").eval() if init.encoder_state else None
        self.train_store, self.dev_store = (model_features(init.encoder, cfg.features, split, tail)
                                            for split in ("train", "dev"))
        self.row = self.train_store.index_of()
        missing = [it.image for it in self.train_items if it.image not in self.row]
        if missing:
            raise ConfigError(f"{len(missing)} train images have no cached features (first: {missing[0]})")
        self.reward = CiderDReward({it.image: it.captions for it in self.train_items}, bleu_weight=cfg.bleu_weight)
        self.dev_eval = dev_items[: cfg.eval_limit] if cfg.eval_limit else dev_items
        self.decoding = DecodingConfig(**{**self.init.decoding, "beam_size": cfg.eval_beam, "num_return_sequences": 1})
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path, self.last_path = self.out / "log.jsonl", self.out / "last.safetensors"
        self.best_path, self.state_path = self.out / "best.safetensors", self.out / "train_state.safetensors"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        self.steps_per_epoch = max(len(self.train_items) // cfg.batch_size, 1)
        self.xe_epoch = int(self.init.training.get("epoch", -1))

    def evaluate(self) -> tuple[float, float, float]:
        t0 = time.time()
        predictions = decode_store(self.model, self.vocab, self.dev_store, [it.image for it in self.dev_eval],
                                   self.decoding)
        scores = score_split(predictions, self.dev_eval, metrics=("BLEU-4", "CIDEr-D"), tokenizer="simple")
        return scores.corpus["BLEU-4"], scores.corpus["CIDEr-D"], time.time() - t0

    def save(self, path: Path, dev: tuple[float, float], counters: dict, dtype: torch.dtype) -> None:
        training = {"phase": "scst", "init": str(self.cfg.init), "config": asdict(self.cfg),
                    "epoch": counters["epoch_value"], "steps": counters["steps"],
                    "dev": {"BLEU-4": dev[0], "CIDEr-D": dev[1]}, "init_dev": counters["init_dev"], "log": "log.jsonl"}
        save_checkpoint(path, self.model, self.vocab, encoder=self.init.encoder, training=training,
                        decoding=self.decoding.to_dict(), dtype=dtype,
                        encoder_state=self.init.encoder_state)   # a fine-tuned tail rides along

    def start(self) -> tuple[dict, list[str]]:
        """(counters, log lines): resumed from the last commit, or fresh with the init model scored and saved
        as the first best.safetensors."""
        if self.resume and self.last_path.is_file() and self.state_path.is_file():
            self.model.load_state_dict(load_checkpoint(self.last_path).model.state_dict())   # float32: exact
            counters = load_train_state(self.state_path, optimizer=self.optimizer, scheduler=None)
            log_lines = [l for l in self.log_path.read_text().splitlines() if l.strip()][: counters["log_lines"]]
            print(f"resuming after step {counters['steps']} (best dev CIDEr-D {counters['best_cider']:.3f})")
        else:
            bleu4, cider, _ = self.evaluate()
            print(f"init model: dev BLEU-4 {100 * bleu4:.2f} CIDEr-D {cider:.3f} ({len(self.dev_eval)} images, "
                  f"beam {self.cfg.eval_beam})", flush=True)
            counters = {"steps": 0, "best_cider": cider, "epoch_value": self.xe_epoch, "log_lines": 0,
                        "init_dev": {"BLEU-4": bleu4, "CIDEr-D": cider}}
            self.save(self.best_path, (bleu4, cider), counters, torch.float16)
            log_lines = _init_log_lines(Path(self.cfg.init), self.init.training)
            counters["log_lines"] = len(log_lines)
        atomic_write_text(self.log_path, "".join(l + "\n" for l in log_lines))
        return counters, log_lines

    def batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        """The images of optimiser step `step` (a seeded per-epoch order, so a resumed run sees the same)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        size = self.cfg.batch_size
        order = torch.randperm(len(self.train_items),
                               generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        images = [self.train_items[i].image for i in order[b * size:(b + 1) * size].tolist()]
        with torch.no_grad():   # a fine-tuned tail runs here, frozen
            return images, self.train_store.get(np.asarray([self.row[im] for im in images]))

    def commit(self, counters: dict, log_lines: list[str], window: dict, train_time: float) -> None:
        """Evaluate on dev, log one line, write best (if better) / last checkpoints and the train state."""
        bleu4, cider, eval_time = self.evaluate()
        counters["epoch_value"] = round(self.xe_epoch + counters["steps"] / self.steps_per_epoch, 4)
        record = {"epoch": counters["epoch_value"], "phase": "scst", "steps": counters["steps"],
                  "train_loss": float(np.mean(window["loss"])), "dev_bleu4": bleu4, "dev_cider_d": cider,
                  "reward_sample": float(np.mean(window["reward_sample"])),
                  "reward_greedy": float(np.mean(window["reward_greedy"])), "lr": self.cfg.lr,
                  "epoch_time_s": train_time, "eval_time_s": eval_time,
                  "samples_per_s": len(window["loss"]) * self.cfg.batch_size / max(train_time, 1e-9),
                  "eval_beam": self.cfg.eval_beam, "eval_images": len(self.dev_eval), "time": time.time()}
        if cider > counters["best_cider"]:
            counters["best_cider"] = cider
            self.save(self.best_path, (bleu4, cider), counters, torch.float16)
        log_lines.append(json.dumps(record))
        counters["log_lines"] = len(log_lines)
        self.save(self.last_path, (bleu4, cider), counters, torch.float32)
        if self.cfg.keep_snapshots:
            self.save(self.out / f"step-{counters['steps']:05d}.safetensors", (bleu4, cider), counters, torch.float32)
        save_train_state(self.state_path, optimizer=self.optimizer, scheduler=None, counters=counters)
        atomic_write_text(self.log_path, "".join(l + "\n" for l in log_lines))
        print(f"step {counters['steps']}: dev BLEU-4 {100 * bleu4:.2f} CIDEr-D {cider:.3f} | reward sample "
              f"{record['reward_sample']:.3f} greedy {record['reward_greedy']:.3f} "
              f"({train_time / len(window['loss']):.2f} s/step, eval {eval_time:.0f} s)", flush=True)


def train_scst(cfg: ScstConfig, resume: bool = False) -> Path:
    """Run (or resume) SCST; returns the path of the best checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _ScstRun(cfg, resume)
    counters, log_lines = run.start()
    total_steps = run.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    every = cfg.eval_every_steps or run.steps_per_epoch
    window = {"loss": [], "reward_sample": [], "reward_greedy": []}
    t_train = time.time()
    while counters["steps"] < total_steps:
        step = counters["steps"]
        images, feats = run.batch(step)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)   # per step: resume is exact
        torch.manual_seed(cfg.seed * 1_000_003 + step)                           # dropout stream, if kept
        t0 = time.time()
        stats = scst_step(run.model, run.optimizer, run.reward, run.vocab, feats, images, cfg, generator)
        counters["steps"] = step + 1
        for key in window:
            window[key].append(stats[key])
        print(f"step {step + 1}/{total_steps}: loss {stats['loss']:+.4f} reward sample {stats['reward_sample']:.3f} "
              f"greedy {stats['reward_greedy']:.3f} ({time.time() - t0:.1f} s/step)", flush=True)
        if counters["steps"] % every and counters["steps"] < total_steps:
            continue
        run.commit(counters, log_lines, window, time.time() - t_train)
        window = {key: [] for key in window}
        t_train = time.time()
    return run.best_path


def parse_args(argv: list[str] | None) -> tuple[ScstConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m core.scst", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ScstConfig, required=["init", "data"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    return ScstConfig(**args), resume       # validates itself


@cli_main
def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    print(f"best checkpoint: {train_scst(cfg, resume=resume)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
