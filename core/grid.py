"""A decoding grid over a split: every combination of decoding settings, decoded and scored side by side.

    settings = build_grid(DecodingConfig(), {"beam_size": [1, 3, 5], "length_penalty": [0, 0.5, 1],
                                             "no_repeat_ngram_size": [0, 3]})
    result = evaluate_grid(captioner, items, settings, features_dir="features", split="dev")
    result.table            # one row per setting: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, mean_length, ...

Axes are `DecodingConfig` field names, so any knob the config gains becomes a grid axis without changes
here. What makes a grid fast: captions come from the feature cache in large batches; settings that decode
identically are decoded once (greedy search ignores the length penalty: with one hypothesis there is
nothing to rank); beam settings that differ only in α share one beam search (`beam_search_penalties`: α
only ranks finished hypotheses and decides when to stop, so each α still gets exactly its lone search's
captions); all settings are scored together by `core.batch_metrics` (one PTB and one METEOR JVM, each
distinct caption scored once). Under torchrun the searches are sharded across ranks and rank 0 gathers
the captions and scores them.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from core import corpus
from core.batch_metrics import score_caption_sets, start_meteor
from core.beam_search import beam_search_penalties
from core.data import ImageCaptions
from core.decoding import DecodingConfig
from core.distributed import rank_world
from core.errors import ConfigError
from core.metrics import METRIC_NAMES, Scores

MAX_SETTINGS = 200
DEFAULT_AXES = ("beam_size", "length_penalty", "no_repeat_ngram_size")
SHORT_NAMES = {"beam_size": "beam", "length_penalty": "lp", "no_repeat_ngram_size": "ngram"}
LABEL_NAMES = {"beam_size": "beam", "length_penalty": "α", "no_repeat_ngram_size": "no-repeat"}
STAT_COLUMNS = ("mean_length", "distinct_1", "distinct_2", "ended_with_end", "decode_s")
Progress = Callable[[int, int], None]


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_label(config: DecodingConfig, axes: Sequence[str]) -> str:
    """What the user reads: "beam 3 · α 0.5 · no-repeat 3" (sampling rows say so)."""
    parts = [f"{LABEL_NAMES.get(a, a)} {_fmt(getattr(config, a))}" for a in axes]
    if config.do_sample and "do_sample" not in axes:
        parts.append(f"sampling T {_fmt(config.temperature)}")
    return " · ".join(parts)


def setting_id(config: DecodingConfig, axes: Sequence[str]) -> str:
    """A folder name: "beam3_lp0.5_ngram3" (only the axes given; `beam3` alone for a width sweep)."""
    parts = [f"{SHORT_NAMES.get(a, a)}{_fmt(getattr(config, a))}" for a in axes]
    if config.do_sample and "do_sample" not in axes:
        parts.append(f"sample_t{_fmt(config.temperature)}")
    return "_".join(parts) or "default"


def build_grid(base: DecodingConfig, axes: Mapping[str, Sequence], *,
               extra: Sequence[DecodingConfig] = ()) -> list[DecodingConfig]:
    """The full product of the axes' values applied to `base`, then the `extra` settings (e.g. sampling rows).

    Raises ConfigError naming the problem: an unknown or empty axis, more than MAX_SETTINGS settings, or a
    combination that is not a valid setting (the message names the setting and the rule it breaks).
    """
    known = {f.name for f in dataclasses.fields(DecodingConfig)}
    unknown = [a for a in axes if a not in known]
    if unknown:
        raise ConfigError(f"decoding grid: unknown setting {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    values = {a: list(dict.fromkeys(v)) for a, v in axes.items()}
    empty = [a for a, v in values.items() if not v]
    if empty:
        raise ConfigError(f"decoding grid: no values for {empty[0]} (the grid is empty)")
    size = math.prod(len(v) for v in values.values()) + len(extra) if values else len(extra)
    if size == 0:
        raise ConfigError("decoding grid: no settings (the grid is empty)")
    if size > MAX_SETTINGS:
        counts = " × ".join(f"{len(v)} {a}" for a, v in values.items())
        widest = max(values, key=lambda a: len(values[a])) if values else "extra settings"
        raise ConfigError(f"decoding grid: {counts}{' + extra' if extra else ''} = {size} settings, over the "
                          f"limit of {MAX_SETTINGS}; use fewer values of {widest}")
    names = list(values)
    settings = []
    for combo in itertools.product(*(values[a] for a in names)) if names else ():
        settings.append(_checked(base, dict(zip(names, combo)), names))
    for config in extra:
        settings.append(_checked(config, {}, names))
    unique = list({_key(c): c for c in settings}.values())
    return unique


def _checked(base: DecodingConfig, changes: dict, axes: Sequence[str]) -> DecodingConfig:
    described = ", ".join(f"{a}={_fmt(v)}" for a, v in changes.items()) or setting_label(base, axes)
    try:
        config = dataclasses.replace(base, **changes)   # a DecodingConfig validates itself when made
    except ConfigError as e:
        raise ConfigError(f"decoding grid: the setting {described} is invalid: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"decoding grid: the setting {described} is invalid: {e}") from None
    return config


def _key(config: DecodingConfig) -> tuple:
    return tuple(sorted(config.to_dict().items()))


def decode_key(config: DecodingConfig) -> tuple:
    """Settings with equal keys produce identical captions (greedy search has nothing for α to rank)."""
    if not config.do_sample and config.beam_size == 1:
        config = dataclasses.replace(config, length_penalty=0.0)
    return _key(config)


def search_key(config: DecodingConfig) -> tuple:
    """Settings with equal keys are served by one search: beam settings that differ only in α (see
    `beam_search_penalties`); any other setting is its own search (its `decode_key`)."""
    if config.mode == "beam":
        return _key(dataclasses.replace(config, length_penalty=0.0))
    return decode_key(config)


# -- statistics of one setting's captions -------------------------------------------------------------------

def distinct_n(captions: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the captions (Li et al. 2016's distinct-n); 0 when there are none."""
    grams = [tuple(w[i:i + n]) for w in (c.split() for c in captions) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def caption_stats(entries: Mapping[str, Mapping]) -> dict[str, float]:
    captions = [e["caption"] for e in entries.values()]
    return {"mean_length": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0,
            "distinct_1": distinct_n(captions, 1), "distinct_2": distinct_n(captions, 2),
            "ended_with_end": float(np.mean([bool(e["finished"]) for e in entries.values()])) if captions else 0.0}


# -- the grid ------------------------------------------------------------------------------------------------

@dataclass
class GridResult:
    axes: list[str]
    settings: list[DecodingConfig]
    labels: list[str]                          # one per setting, unique
    captions: dict[str, dict[str, dict]]       # label -> image -> {"caption", "logprob", "length", "finished"}
    scores: dict[str, Scores]                  # label -> scores of that setting
    table: pd.DataFrame                        # one row per setting (see `grid_table`)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)      # seconds per stage: decode, tokenize, METEOR, ...

    def setting(self, label: str) -> DecodingConfig:
        return self.settings[self.labels.index(label)]


def decode_grid(captioner, items: Sequence[ImageCaptions], settings: Sequence[DecodingConfig], *,
                features_dir: str | Path | None, split: str, cache=None, progress: Progress | None = None,
                batch_size: int = 250) -> tuple[list[dict[str, dict]], list[float], float] | None:
    """Captions and decode seconds per setting (a shared search's seconds for each setting it served), and
    the total decode seconds (reading the features included). Under torchrun each rank runs every world-th
    search and rank 0 gets them all (the other ranks get None)."""
    searches: dict[tuple, list[DecodingConfig]] = {}      # search -> its distinct settings (one per α)
    for config in settings:
        group = searches.setdefault(search_key(config), [])
        if all(decode_key(c) != decode_key(config) for c in group):
            group.append(config)
    todo = list(searches.values())
    rank, world = rank_world()
    mine = [todo[k] for k in range(len(todo)) if k % world == rank]
    t0 = time.perf_counter()
    runs = decode_searches(captioner, items, mine, features_dir=features_dir, split=split, cache=cache,
                           progress=progress, batch_size=batch_size)
    done: dict[tuple, tuple[dict, float]] = {
        decode_key(c): (run.captions, float(run.decode_s)) for group, group_runs in zip(mine, runs)
        for c, run in zip(group, group_runs)}
    seconds = time.perf_counter() - t0
    if world > 1:
        gathered: list | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object((done, seconds), gathered, dst=0)
        if rank != 0:
            return None
        done = {k: v for part, _ in gathered for k, v in part.items()}
        seconds = sum(s for _, s in gathered)
    per_setting = [done[decode_key(c)] for c in settings]
    return [p[0] for p in per_setting], [p[1] for p in per_setting], float(seconds)


def _search(captioner, feats: torch.Tensor, configs: Sequence[DecodingConfig]) -> list[list[dict]]:
    """The best-caption entries of one batch for each config of one search (equal `search_key`)."""
    if len(configs) == 1 or configs[0].mode != "beam":
        return [corpus.best_entries(captioner.decode, captioner.vocab, feats, c) for c in configs]
    per_alpha = beam_search_penalties(captioner.model, feats.to(captioner.device).float(), configs[0],
                                      [c.length_penalty for c in configs], captioner.vocab)
    return [[corpus.caption_entry(captioner.vocab, nbest[0]) for nbest in nbests] for nbests in per_alpha]


def decode_searches(captioner, items: Sequence[ImageCaptions], searches: Sequence[Sequence[DecodingConfig]], *,
                    features_dir: str | Path | None, split: str, cache=None, progress: Progress | None = None,
                    batch_size: int = 250) -> list[list[corpus.SplitCaptions]]:
    """`corpus.caption_split` of every config of every search, with each batch of features read (or encoded)
    once for all the searches: a fine-tuned encoder tail or the image files cost one pass, not one per
    search. Configs one search serves (equal `search_key`, e.g. beam settings differing only in α) run one
    `beam_search_penalties`. Each result is cached as caption_split caches it, and searches whose configs
    are all cached are not run. A search's `decode_s` is its own decoding time, without the reading."""
    names = [it.image for it in items]
    split_runs = [[corpus.split_run(captioner, c, split, names, cache) for c in group] for group in searches]
    results: list[list[corpus.SplitCaptions | None]] = [[run.finished() for run in group] for group in split_runs]
    pending = [k for k, group in enumerate(results) if any(hit is None for hit in group)]
    if not pending:
        if progress:
            progress(len(names), len(names))
        return results
    store = corpus.open_feature_store(captioner, features_dir, split)
    row = store.index_of() if store is not None else {}
    sources: set[str] = set()
    done = {k: [dict() for _ in searches[k]] for k in pending}
    elapsed = dict.fromkeys(pending, 0.0)
    for chunk, feats in corpus.feature_batches(captioner, items, store, row, batch_size, sources):
        for k in pending:
            t0 = time.perf_counter()
            for captions, entries in zip(done[k], _search(captioner, feats, searches[k])):
                captions.update(zip((it.image for it in chunk), entries))
            elapsed[k] += time.perf_counter() - t0
        if progress:
            progress(len(done[pending[0]][0]), len(names))
    source = "+".join(sorted(sources)) or "cache"
    for k in pending:
        for j, run in enumerate(split_runs[k]):
            results[k][j] = corpus.SplitCaptions({n: done[k][j][n] for n in names}, elapsed[k], source)
            run.save(results[k][j])
    return results


def evaluate_grid(captioner, items: Sequence[ImageCaptions], settings: Sequence[DecodingConfig],
                  axes: Sequence[str] = DEFAULT_AXES, *, features_dir: str | Path | None = "features",
                  split: str = "dev", cache=None, progress: Progress | None = None, with_meteor: bool = True,
                  tokenizer: str = "ptb", batch_size: int = 250) -> GridResult | None:
    """Decode and score every setting on `items` (None on the non-zero ranks under torchrun)."""
    if not settings:
        raise ConfigError("decoding grid: no settings (the grid is empty)")
    if len(settings) > MAX_SETTINGS:
        raise ConfigError(f"decoding grid: {len(settings)} settings, over the limit of {MAX_SETTINGS}")
    if not items:
        raise ConfigError(f"decoding grid: the {split} split has no images")
    rank = rank_world()[0]
    # the METEOR JVM takes a while to load: it does so on the other core while this one decodes
    meteor = start_meteor() if with_meteor and rank == 0 else None
    try:
        decoded = decode_grid(captioner, items, settings, features_dir=features_dir, split=split, cache=cache,
                              progress=progress, batch_size=batch_size)
    except BaseException:
        if meteor is not None:
            meteor.close()
        raise
    if decoded is None:
        return None
    captions, times, decode_s = decoded
    labels = _unique_labels([setting_label(c, axes) for c in settings])
    references = {it.image: list(it.captions) for it in items}
    metrics = [m for m in METRIC_NAMES if with_meteor or m != "METEOR"]
    timings: dict = {"decode": decode_s}
    scores = score_caption_sets({label: {n: e["caption"] for n, e in caps.items()}
                                 for label, caps in zip(labels, captions)}, references, metrics=metrics,
                                tokenizer=tokenizer, meteor=meteor, timings=timings)
    table = grid_table(settings, labels, axes, dict(zip(labels, captions)), scores, times, len(items))
    notes = sorted({note for s in scores.values() for note in s.notes})
    return GridResult(list(axes), list(settings), labels, dict(zip(labels, captions)), scores, table, notes,
                      timings)


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def grid_table(settings: Sequence[DecodingConfig], labels: Sequence[str], axes: Sequence[str],
               captions: Mapping[str, Mapping[str, dict]], scores: Mapping[str, Scores],
               times: Sequence[float], images: int) -> pd.DataFrame:
    """setting, each axis, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, mean_length, distinct_1, distinct_2,
    ended_with_end (share of captions that emitted <end>), decode_s, images."""
    rows = []
    for config, label, seconds in zip(settings, labels, times):
        row = {"setting": label, **{a: getattr(config, a) for a in axes}}
        row.update({m: scores[label].corpus.get(m, math.nan) for m in METRIC_NAMES})
        row.update(caption_stats(captions[label]), decode_s=seconds, images=images)
        rows.append(row)
    return pd.DataFrame(rows, columns=["setting", *axes, *METRIC_NAMES, *STAT_COLUMNS, "images"])


def changed_images(result: GridResult, items: Sequence[ImageCaptions], a: str, b: str,
                   metric: str = "CIDEr-D") -> pd.DataFrame:
    """Images whose caption differs between settings `a` and `b`, biggest |metric change| first:
    image, caption_a, caption_b, references (list), metric_a, metric_b, delta (b - a)."""
    for label in (a, b):
        if label not in result.captions:
            raise ConfigError(f"no setting {label!r} in this grid; choose from {', '.join(result.labels)}")
    if metric not in result.table.columns:
        raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_NAMES)}")
    rows = []
    for it in items:
        cap_a, cap_b = result.captions[a][it.image]["caption"], result.captions[b][it.image]["caption"]
        if cap_a == cap_b:
            continue
        va = result.scores[a].per_image.get(it.image, {}).get(metric, math.nan)
        vb = result.scores[b].per_image.get(it.image, {}).get(metric, math.nan)
        rows.append({"image": it.image, "path": str(it.path), "caption_a": cap_a, "caption_b": cap_b,
                     "references": list(it.captions), "metric_a": va, "metric_b": vb, "delta": vb - va})
    frame = pd.DataFrame(rows, columns=["image", "path", "caption_a", "caption_b", "references", "metric_a",
                                        "metric_b", "delta"])
    order = frame["delta"].abs().sort_values(ascending=False, kind="stable").index
    return frame.loc[order].reset_index(drop=True)
