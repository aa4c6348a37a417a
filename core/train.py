"""Train a Show-Attend-Tell captioner from cached encoder features (teacher forcing, cross-entropy).

    python -m core.features --data ../shared/flickr8k --split train dev         # once
    python -m core.train --data ../shared/flickr8k --out runs/lite2             # background-friendly
    python -m core.train --data ../shared/flickr8k --out runs/lite2 --resume    # after a kill

Each epoch: shuffle (seeded by seed+epoch, so a resumed run sees the same order), Adam with gradient
clipping, dev-split decoding + BLEU-4/CIDEr-D, one JSONL log line, `last.safetensors` (+ `train_state`) and,
when dev BLEU-4 improves, `best.safetensors` — all written atomically. The learning rate drops when dev
BLEU-4 plateaus; training stops early after `patience` epochs without improvement. `train_state` is written
last: it holds the weights, optimizer, scheduler, RNG and counters and is the commit point --resume continues
from. A kill loses at most one epoch (the one in progress or the one being committed), and a resumed run ends
at the same weights as an uninterrupted one (same seed, hardware and thread count).

Scale-out: `torchrun --nproc_per_node N -m core.train ...` trains with DistributedDataParallel (gloo on CPU,
nccl on GPU). Every rank draws the same seeded permutation and takes `batch[rank::world]` of each *global*
batch of `--batch-size` samples: the DistributedSampler interleaving, applied per batch, so an N-rank step
sees exactly the samples of the 1-rank step. The loss is normalised by the global token count (and the
attention penalty by the global batch size), so the update equals the 1-rank update. Rank 0 alone logs,
decodes the dev split and writes files; it broadcasts the dev scores so the LR schedule and early stopping
stay in step on every rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from core.checkpoint import load_checkpoint, save_checkpoint
from core.corpus import decode_store, score_split
from core.cli import add_config_arguments
from core.data import ImageCaptions, load_dataset
from core.decoding import DecodingConfig
from core.distributed import rank_world, torchrun_group
from core.encoders import build_encoder, encoder_spec, feature_key
from core.errors import ConfigError, DataError, cli_main
from core.features import FeatureStore, LiveFeatures, TailFeatures, cache_paths, open_features
from core.io_utils import atomic_write_text, remove_stale_temp_files
from core.model import ModelConfig, ShowAttendTell, caption_loss
from core.text import Vocabulary, tokenize
from core.train_state import load_train_state, save_train_state


@dataclass
class TrainConfig:
    data: str = ""
    features: str = "features"
    encoder: str = "efficientnet_lite2"
    out: str = "runs/lite2"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    lr_decay: float = 0.5           # factor on plateau of dev BLEU-4
    lr_patience: int = 1            # epochs without improvement before a decay
    patience: int = 4               # early stopping
    grad_clip: float = 5.0
    alpha_c: float = 1.0            # λ of the doubly stochastic attention term
    label_smoothing: float = 0.0
    min_count: int = 5
    max_words: int = 22             # longer training captions are truncated
    precision: str = "bf16"         # autocast dtype for the forward pass: bf16 (2x faster on AVX512-BF16) | fp32
    eval_beam: int = 3
    eval_limit: int = 0             # 0 = the whole dev split
    seed: int = 0
    threads: int = 0                # 0 = torch default
    max_steps: int = 0              # stop after this many optimiser steps (tests, benchmarks); 0 = no limit
    image_size: int = 224           # encoder input side in px; the attention grid is image_size / 32 (7 at 224)
    fine_tune_blocks: int = 0       # > 0: also train the encoder's last N stages: from the activations cached by
                                    # `core.features --tail-stages N` when present (cheap), else from the images
    encoder_weights: str = "imagenet"   # the encoder to fine-tune: imagenet | none | PATH
    encoder_lr: float = 1e-4
    init: str = ""                  # start from this checkpoint's decoder (and vocabulary) instead of random

    def __post_init__(self) -> None:
        encoder_spec(self.encoder, self.image_size)   # a known encoder at a valid size, or a named error
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.batch_size < 1 or self.epochs < 1 or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError("batch size and epochs must be >= 1 and the learning rate > 0")


def build_vocab(items: list[ImageCaptions], min_count: int) -> Vocabulary:
    return Vocabulary.build((tokenize(c) for it in items for c in it.captions), min_count=min_count)


def encode_samples(items: list[ImageCaptions], store: FeatureStore, vocab: Vocabulary,
                   max_words: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """One sample per (image, caption): the image's row in the feature store and the caption's ids."""
    row = store.index_of()
    missing = [it.image for it in items if it.image not in row]
    if missing:
        raise ConfigError(f"{len(missing)} images have no cached features (first: {missing[0]}); rerun core.features")
    rows, captions = [], []
    for it in items:
        for c in it.captions:
            rows.append(row[it.image])
            captions.append(torch.tensor(vocab.encode(tokenize(c), max_length=max_words)))
    return np.asarray(rows), captions


def distributed_caption_loss(logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor,
                             lengths: torch.Tensor, *, alpha_c: float, label_smoothing: float,
                             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`caption_loss` for one rank's share of a global batch, scaled so DDP's gradient *average* equals the
    gradient of the global-batch loss: sum over local tokens / global tokens, times world size.

    Returns (loss to backpropagate, global loss, global cross-entropy); the last two are detached and
    identical on every rank (for logging).
    """
    world = torch.distributed.get_world_size()
    targets = captions[:, 1:]
    mask = targets != pad_id
    counts = torch.stack([mask.sum(), torch.tensor(captions.shape[0], device=mask.device)]).double()
    torch.distributed.all_reduce(counts)                        # global tokens, global batch size
    tokens, batch = counts[0].item(), counts[1].item()
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id,
                             label_smoothing=label_smoothing, reduction="sum")
    ce = ce_sum / tokens
    loss = ce
    if alpha_c > 0:
        coverage = (alphas * mask.unsqueeze(2).to(alphas.dtype)).sum(dim=1)     # (B_local, L)
        loss = ce + alpha_c * ((1.0 - coverage) ** 2).sum() / (batch * alphas.shape[2])
    stats = torch.stack([loss.detach(), ce.detach()]).double()
    torch.distributed.all_reduce(stats)                         # sum of local parts = global values
    return loss * world, stats[0], stats[1]


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: FeatureStore, rows: np.ndarray,
              captions: list[torch.Tensor], cfg: TrainConfig, epoch: int, device: str, step_budget: int) -> dict:
    """One pass over the samples in a seeded order; returns mean losses, samples/s and steps taken."""
    rank, world = rank_world()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).numpy()
    torch.manual_seed(cfg.seed * 1000 + epoch + 1 + rank)   # dropout stream, per rank
    model.train()
    n_batches = len(order) // cfg.batch_size if len(order) >= cfg.batch_size else 1
    total, total_ce, steps, t0 = 0.0, 0.0, 0, time.time()
    bar = tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", disable=rank != 0, leave=False)
    for b in bar:
        if step_budget and steps >= step_budget:
            break
        batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = batch[rank::world]                       # each rank takes its share of the global batch
                                                         # (DistributedSampler's rank::world interleave)
        feats = store.get(rows[batch]).to(device)
        caps = [captions[i] for i in batch]
        lengths = torch.tensor([len(c) for c in caps], device=device)
        caps = pad_sequence(caps, batch_first=True, padding_value=0).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits, alphas = model(feats, caps, lengths)
        if world > 1:
            loss, loss_value, ce_value = distributed_caption_loss(
                logits.float(), alphas.float(), caps, lengths, alpha_c=cfg.alpha_c,
                label_smoothing=cfg.label_smoothing)
        else:
            loss, ce = caption_loss(logits.float(), alphas.float(), caps, lengths, alpha_c=cfg.alpha_c,
                                    label_smoothing=cfg.label_smoothing)
            loss_value, ce_value = loss.detach(), ce.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                                  # DDP all-reduces (averages) the gradients here
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        total, total_ce, steps = total + loss_value.item(), total_ce + ce_value.item(), steps + 1
        bar.set_postfix(loss=f"{total / steps:.3f}")
    elapsed = time.time() - t0
    return {"train_loss": total / max(steps, 1), "train_ce": total_ce / max(steps, 1), "steps": steps,
            "samples_per_s": steps * cfg.batch_size / max(elapsed, 1e-9), "epoch_time_s": elapsed}


def _device(cfg: TrainConfig, world: int) -> str:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world > 1 and cfg.batch_size < world:
        raise ConfigError(f"--batch-size ({cfg.batch_size}) is the global batch: it must be >= the number "
                          f"of ranks ({world})")
    return device


def _feature_stores(cfg: TrainConfig, train_items: list[ImageCaptions], dev_items: list[ImageCaptions],
                    device: str, world: int):
    """(train store, dev store, trainable encoder or None). Frozen: the feature cache at the input size.
    Fine-tuning the last N stages: the cache of activations entering them when it exists (a step then costs
    those stages only), else the images, encoded at every step."""
    if cfg.fine_tune_blocks <= 0:
        key = feature_key(cfg.encoder, cfg.image_size)
        return open_features(cfg.features, key, "train"), open_features(cfg.features, key, "dev"), None
    if world > 1:
        raise ConfigError("--fine-tune-blocks is single-process only")
    encoder = build_encoder(cfg.encoder, cfg.encoder_weights, cfg.image_size).to(device)
    encoder.set_trainable_blocks(cfg.fine_tune_blocks)
    key = feature_key(cfg.encoder, cfg.image_size, cfg.fine_tune_blocks)
    try:
        train_acts, dev_acts = (open_features(cfg.features, key, split, weights_sha256=encoder.weights_sha256)
                                for split in ("train", "dev"))
    except DataError as e:
        if cache_paths(cfg.features, key, "train")[1].is_file():   # there, but stale or foreign: never reuse it
            raise
        print(f"no activation cache ({e}); encoding the images at every step (slow on a CPU)", flush=True)
        return (LiveFeatures(encoder, [it.path for it in train_items]),
                LiveFeatures(encoder, [it.path for it in dev_items]), encoder)
    n = cfg.fine_tune_blocks
    return TailFeatures(train_acts, encoder, n), TailFeatures(dev_acts, encoder, n), encoder


def _model_and_vocab(cfg: TrainConfig, train_items: list[ImageCaptions], overrides: dict | None,
                     device: str) -> tuple[ShowAttendTell, Vocabulary]:
    """A fresh model and the training vocabulary, or (`--init`) a checkpoint's decoder and its vocabulary."""
    spec = encoder_spec(cfg.encoder, cfg.image_size)
    init = load_checkpoint(cfg.init) if cfg.init else None
    vocab = init.vocab if init else build_vocab(train_items, cfg.min_count)
    model_cfg = init.model.config if init else ModelConfig(
        vocab_size=len(vocab), encoder_dim=spec.feature_dim, num_regions=spec.num_regions, **(overrides or {}))
    if model_cfg.num_regions != spec.num_regions:
        raise ConfigError(f"--init {cfg.init} attends over {model_cfg.num_regions} regions but "
                          f"--image-size {cfg.image_size} gives {spec.num_regions}")
    torch.manual_seed(cfg.seed)
    model = ShowAttendTell(model_cfg).to(device)
    if init:
        model.load_state_dict(init.model.state_dict())
    return model, vocab


def _optimizer(model: ShowAttendTell, encoder, cfg: TrainConfig):
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if encoder is not None:
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr})
    optimizer = torch.optim.Adam(groups, fused=True)   # one kernel for all parameters: 17 -> 4 ms a step on 2 cores
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    return optimizer, scheduler


@dataclass(frozen=True)
class _RunFiles:
    out: Path

    log = property(lambda self: self.out / "log.jsonl")
    last = property(lambda self: self.out / "last.safetensors")
    best = property(lambda self: self.out / "best.safetensors")
    state = property(lambda self: self.out / "train_state.safetensors")


def _resume(files: _RunFiles, optimizer, scheduler, model: ShowAttendTell, encoder, rank: int) -> dict:
    """The counters of the last committed epoch, with model, encoder, optimizer and scheduler restored."""
    counters = load_train_state(files.state, optimizer=optimizer, scheduler=scheduler, model=model)
    if not counters.pop("model_restored"):   # a state file from before weights were stored in it
        if not files.last.is_file():
            raise ConfigError(f"{files.state} holds no weights and {files.last} is missing: cannot resume")
        model.load_state_dict(load_checkpoint(files.last).model.state_dict())   # float32: exact
    if encoder is not None:
        encoder.load_encoder_state(load_checkpoint(files.last).encoder_state, encoder.trainable_blocks)
    if rank == 0:
        print(f"resuming after epoch {counters['epoch'] - 1} (best BLEU-4 {counters['best_bleu4']:.4f})")
    return counters


def _dev_scores(model: ShowAttendTell, vocab: Vocabulary, dev_store, dev_eval: list[ImageCaptions],
                decoding: DecodingConfig, device: str) -> tuple[float, float]:
    """Dev BLEU-4 and CIDEr-D, decoded on rank 0 and broadcast (same LR schedule and early stop everywhere)."""
    rank, world = rank_world()
    bleu4, cider = 0.0, 0.0
    if rank == 0:   # one rank decodes; the others wait at the broadcast instead of repeating the work
        predictions = decode_store(model, vocab, dev_store, [it.image for it in dev_eval], decoding, device=device)
        # the pure-python tokenizer gives PTB's tokens on all Flickr8K captions and needs no Java round trip
        scores = score_split(predictions, dev_eval, metrics=("BLEU-4", "CIDEr-D"), tokenizer="simple")
        bleu4, cider = scores.corpus["BLEU-4"], scores.corpus["CIDEr-D"]
    if world > 1:
        shared = torch.tensor([bleu4, cider], dtype=torch.float64, device=device)
        torch.distributed.broadcast(shared, src=0)
        bleu4, cider = float(shared[0]), float(shared[1])
    return bleu4, cider


def train(cfg: TrainConfig, model_cfg_overrides: dict | None = None, resume: bool = False) -> Path:
    """Run (or resume) training; returns the path of the best checkpoint."""
    rank, world = rank_world()
    device = _device(cfg, world)
    files = _RunFiles(Path(cfg.out))
    files.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(cfg.data)
    train_items, dev_items = dataset.split("train"), dataset.split("dev")
    spec = encoder_spec(cfg.encoder, cfg.image_size)
    train_store, dev_store, encoder = _feature_stores(cfg, train_items, dev_items, device, world)
    model, vocab = _model_and_vocab(cfg, train_items, model_cfg_overrides, device)
    optimizer, scheduler = _optimizer(model, encoder, cfg)
    counters = {"epoch": 0, "best_bleu4": -1.0, "best_epoch": -1, "epochs_since_best": 0, "steps": 0}
    if rank == 0:
        remove_stale_temp_files(files.out, [files.log.name, files.last.name, files.best.name, files.state.name])
    if resume and files.state.is_file():
        counters = _resume(files, optimizer, scheduler, model, encoder, rank)
    log_lines = [l for l in (files.log.read_text().splitlines() if files.log.is_file() else [])
                 if l.strip() and json.loads(l)["epoch"] < counters["epoch"]]
    if rank == 0:
        atomic_write_text(files.log, "".join(l + "\n" for l in log_lines))

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)   # broadcasts rank 0's weights
    rows, caps = encode_samples(train_items, train_store, vocab, cfg.max_words)
    dev_eval = dev_items[: cfg.eval_limit] if cfg.eval_limit else dev_items
    decoding = DecodingConfig(beam_size=cfg.eval_beam, max_length=cfg.max_words)
    meta = {"encoder": {"name": cfg.encoder, "weights_sha256": train_store.weights_sha256,
                        "weights_source": spec.weights_source, "fine_tuned": encoder is not None,
                        "image_size": spec.image_size, "grid": spec.grid, "tail_stages": cfg.fine_tune_blocks}}
    if encoder is not None:   # only the trained stages: the rest is the (recorded) pretrained weights
        meta["encoder_state"] = encoder.tail_state_dict(cfg.fine_tune_blocks)   # live tensors, saved as trained
    for epoch in range(counters["epoch"], cfg.epochs):
        budget = cfg.max_steps - counters["steps"] if cfg.max_steps else 0
        if (cfg.max_steps and budget <= 0) or counters["epochs_since_best"] >= cfg.patience:
            break           # the step budget is spent, or resumed after the epoch that stopped it
        stats = run_epoch(train_model, optimizer, train_store, rows, caps, cfg, epoch, device, budget)
        counters["steps"] += stats["steps"]
        t_eval = time.time()
        bleu4, cider = _dev_scores(model, vocab, dev_store, dev_eval, decoding, device)
        scheduler.step(bleu4)
        improved = bleu4 > counters["best_bleu4"]
        counters.update(epoch=epoch + 1, epochs_since_best=0 if improved else counters["epochs_since_best"] + 1)
        if improved:
            counters.update(best_bleu4=bleu4, best_epoch=epoch)
        record = {"epoch": epoch, **stats, "dev_bleu4": bleu4, "dev_cider_d": cider,
                  "lr": optimizer.param_groups[0]["lr"], "eval_time_s": time.time() - t_eval,
                  "eval_beam": cfg.eval_beam, "eval_images": len(dev_eval), "time": time.time()}
        if rank == 0:
            training = {"config": asdict(cfg), "epoch": epoch, "dev": {"BLEU-4": bleu4, "CIDEr-D": cider},
                        "best_epoch": counters["best_epoch"], "log": "log.jsonl"}
            if improved:
                save_checkpoint(files.best, model, vocab, training=training, decoding=decoding.to_dict(), **meta)
            save_checkpoint(files.last, model, vocab, training=training, decoding=decoding.to_dict(),
                            dtype=torch.float32, **meta)
            log_lines.append(json.dumps(record))
            atomic_write_text(files.log, "".join(l + "\n" for l in log_lines))
            # the commit point: a kill before it redoes this epoch (same result), a kill after it does not
            save_train_state(files.state, optimizer=optimizer, scheduler=scheduler, counters=counters, model=model)
            print(f"epoch {epoch}: loss {stats['train_loss']:.3f} dev BLEU-4 {100 * bleu4:.2f} CIDEr-D {cider:.3f} "
                  f"lr {record['lr']:.1e} ({stats['epoch_time_s']:.0f}+{record['eval_time_s']:.0f} s)", flush=True)
        if counters["epochs_since_best"] >= cfg.patience:
            if rank == 0:
                print(f"early stop: no dev BLEU-4 gain for {cfg.patience} epochs")
            break
    return files.best


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, dict, bool]:
    parser = argparse.ArgumentParser(prog="python -m core.train", description=__doc__.split("\n\n")[0])
    train_fields = add_config_arguments(parser, TrainConfig, required=["data"])
    add_config_arguments(parser, ModelConfig, skip=["vocab_size", "encoder_dim", "num_regions"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    cfg = TrainConfig(**{name: args.pop(name) for name in train_fields})   # validates itself
    return cfg, args, resume


@cli_main
def main(argv: list[str] | None = None) -> int:
    cfg, model_overrides, resume = parse_args(argv)
    with torchrun_group() as (rank, _):
        best = train(cfg, model_overrides, resume=resume)
        if rank == 0:
            print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
