"""Score many caption sets of the same images at once (a decoding grid, two checkpoints), as coco-caption does.

`score_caption_sets({"beam 1": preds1, "beam 3": preds3, ...}, references)` gives, per set, exactly what
`core.metrics.score_captions` gives for that set alone (the tests check it), but pays for the external tools
once instead of once per set:

- one PTBTokenizer JVM for the references and every *distinct* predicted caption of every set;
- one METEOR JVM: the jar's per-caption statistics (its `SCORE` lines) are computed once per distinct
  (image, caption) pair and streamed without a round trip per line; then one `EVAL` line per set turns them
  into that set's per-image scores and its corpus aggregate, the same two numbers `Meteor.compute_score`
  reads back. Settings of a grid share most of their captions, so most pairs are scored once.

BLEU, ROUGE-L and CIDEr-D stay pycocoevalcap's pure-python scorers, called once per set (CIDEr-D's idf comes
from the references of the set's images, so the per-set call is what keeps it equal to a lone run).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from core.errors import DataError
from core.metrics import (BLEU_NAMES, JAVA_MISSING_NOTE, METEOR_TIMEOUT_BASE_S, METEOR_TIMEOUT_PER_IMAGE_S,
                          METRIC_NAMES, Scores, ScoreTable, _make_meteor, _meteor_safe, _tokenize_all, _validate,
                          java_available)


def start_meteor():
    """A METEOR JVM started now (it loads its paraphrase table while the caller does other work, e.g.
    decoding), for `score_caption_sets(..., meteor=)`; None without Java. That call closes it."""
    if not java_available():
        return None
    try:
        return _make_meteor()
    except Exception:  # noqa: BLE001 - no JVM now: score_caption_sets starts one or notes why not
        return None


def _meteor_many(pairs: list[tuple[list[str], str]], groups: list[list[int]],
                 meteor=None) -> list[tuple[float, list[float]]]:
    """One METEOR process: statistics of each (references, hypothesis) pair, then an aggregate per group of
    pair indices. Raises on a dead or stuck jar (a watchdog kills it), so the caller can skip METEOR."""
    meteor = meteor or _make_meteor()
    proc = meteor.meteor_p
    lines = [" ||| ".join(("SCORE", " ||| ".join(refs), hyp)) + "\n" for refs, hyp in pairs]
    watchdog = threading.Timer(METEOR_TIMEOUT_BASE_S + METEOR_TIMEOUT_PER_IMAGE_S * len(pairs), meteor.kill)
    watchdog.daemon = True
    watchdog.start()
    failure: list[BaseException] = []

    def write_all() -> None:   # a writer thread: the jar answers while we still send, no pipe can fill up
        try:
            for line in lines:
                proc.stdin.write(line.encode())
            proc.stdin.flush()
        except (OSError, ValueError) as exc:   # the jar died (or was killed by the watchdog)
            failure.append(exc)

    try:
        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        stats = [proc.stdout.readline().decode().strip() for _ in lines]
        writer.join()
        if failure or any(not s for s in stats):
            raise RuntimeError("the METEOR jar stopped answering")
        results = []
        for group in groups:
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats[i] for i in group) + "\n").encode())
            proc.stdin.flush()
            scores = [float(proc.stdout.readline().strip()) for _ in group]
            results.append((float(proc.stdout.readline().strip()), scores))
        return results
    finally:
        watchdog.cancel()
        meteor.close()


def score_caption_sets(sets: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]], *,
                       metrics: Sequence[str] = METRIC_NAMES, tokenizer: str = "ptb",
                       timings: dict | None = None, meteor=None) -> dict[str, Scores]:
    """Per set name, the Scores of that set's captions (image -> caption) against `references`.

    Same rules as `score_captions`: only the images of a set are scored, METEOR is skipped with a note when
    Java is missing or the jar fails, and the fallback tokenizer is used (with a note) without Java.
    `timings`, if a dict, receives the seconds spent per stage (tokenize, METEOR, BLEU, ROUGE-L, CIDEr-D).
    `meteor`: a JVM from `start_meteor` to use (and close) instead of starting one.
    """
    try:
        return _score_sets(sets, references, metrics, tokenizer, timings, meteor)
    finally:
        if meteor is not None:
            meteor.close()


def _score_sets(sets, references, metrics, tokenizer, timings, meteor) -> dict[str, Scores]:
    clock = timings if timings is not None else {}
    t0 = time.perf_counter()
    if not sets:
        raise DataError("no caption sets to score")
    checked = {name: _validate(preds, references, metrics, tokenizer) for name, preds in sets.items()}
    wanted = next(iter(checked.values()))[2]
    all_refs: dict[str, list[str]] = {}
    for preds, refs, _ in checked.values():
        all_refs.update(refs)
    distinct = sorted({c for preds, _, _ in checked.values() for c in preds.values()})
    caption_key = {c: f"c{i}" for i, c in enumerate(distinct)}
    common_notes: list[str] = []
    gts_all, res_all = _tokenize_all(all_refs, {caption_key[c]: c for c in distinct}, tokenizer, common_notes)
    tokenized = {c: res_all[caption_key[c]][0] for c in distinct}
    clock["tokenize"] = time.perf_counter() - t0

    per_set: dict[str, tuple[dict, dict]] = {}
    for name, (preds, refs, _) in checked.items():
        gts = {image: gts_all[image] for image in preds}
        res = {image: [tokenized[caption]] for image, caption in preds.items()}
        per_set[name] = (gts, res)
    # METEOR works in its own JVM: a thread feeds it while this one computes BLEU, ROUGE-L and CIDEr-D
    t0 = time.perf_counter()
    meteor_notes: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_meteor_for_sets, per_set, meteor_notes, meteor) if "METEOR" in wanted else None
        shared = _pair_scores(per_set, wanted)
        clock["ROUGE-L+CIDEr-D per distinct pair"] = time.perf_counter() - t0
        partial: dict[str, tuple[Scores, list[str]]] = {}
        for name, (gts, res) in per_set.items():
            pair = {m: [shared[m][(i, h)] for i, (h,) in res.items()] for m in shared}
            later: list[str] = []                 # the notes _score_one adds (CIDEr-D's)
            partial[name] = (_score_one(gts, res, wanted, None, later, clock, pair), later)
        meteor_scores = pending.result() if pending is not None else {}
    clock["METEOR (beside the others)"] = time.perf_counter() - t0
    clock["distinct_pairs"] = len({(i, h) for _, res in per_set.values() for i, (h,) in res.items()})
    out: dict[str, Scores] = {}
    for name, (preds, refs, _) in checked.items():
        scores, later = partial[name]
        notes = common_notes + meteor_notes
        unscored = len(set(map(str, references)) - set(preds))
        if unscored:
            notes.append(f"{unscored} image(s) with references but no prediction were not scored")
        out[name] = _with_meteor(scores, meteor_scores.get(name), wanted, notes + later)
    return out


def _with_meteor(scores: Scores, meteor: tuple[float, list] | None, wanted: list[str], notes: list[str]) -> Scores:
    """`scores` plus METEOR's corpus and per-image values (if any), metrics in the order asked for."""
    corpus, per_image = dict(scores.corpus), {image: dict(v) for image, v in scores.per_image.items()}
    if meteor is not None:
        corpus["METEOR"] = float(meteor[0])
        for image, value in zip(per_image, meteor[1]):
            per_image[image]["METEOR"] = float(value)
    return Scores(corpus={m: corpus[m] for m in wanted if m in corpus},
                  per_image={image: {m: v[m] for m in wanted if m in v} for image, v in per_image.items()},
                  notes=notes)


class _ImageCount(list):
    """CiderScorer's crefs, one per (image, caption) pair, whose len() is the number of images: compute_cider
    takes idf's log N from len(crefs), and N must be the images scored, as in a lone run."""

    def __init__(self, items, images: int):
        super().__init__(items)
        self.images = images

    def __len__(self) -> int:
        return self.images


def _pair_scores(per_set: dict[str, tuple[dict, dict]], wanted: list[str]) -> dict[str, dict]:
    """ROUGE-L and CIDEr-D of each distinct (image, caption) pair, when every set scores the same images.

    A per-image ROUGE-L depends only on the caption and its references, and a per-image CIDEr-D also on the
    idf, which comes from the references of the scored images: the same for every set then. So each pair is
    scored once, with pycocoevalcap's own scorers, and a set's values are looked up (corpus = their mean,
    as the toolkit computes it). Sets over different images are scored one by one instead ({} here).
    """
    from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test
    from pycocoevalcap.rouge.rouge import Rouge

    sets = list(per_set.values())
    images = list(sets[0][0])
    if len(sets) < 2 or any(list(gts) != images for gts, _ in sets):
        return {}
    gts = sets[0][0]
    pairs = list(dict.fromkeys((i, h) for _, res in sets for i, (h,) in res.items()))
    out: dict[str, dict] = {}
    if "ROUGE-L" in wanted:
        rouge = Rouge()
        out["ROUGE-L"] = {(i, h): float(rouge.calc_score([h], gts[i])) for i, h in pairs}
    if "CIDEr-D" in wanted and any(c.split() for caps in gts.values() for c in caps):
        scorer = CiderScorer(n=4, sigma=6.0)
        for image in images:
            scorer += (None, gts[image])
        scorer.compute_doc_freq()
        scorer.crefs = _ImageCount([cook_refs(gts[i]) for i, _ in pairs], len(images))
        scorer.ctest = [cook_test(h) for _, h in pairs]
        out["CIDEr-D"] = dict(zip(pairs, (float(x) for x in scorer.compute_cider())))
    return out


def _meteor_for_sets(per_set: dict[str, tuple[dict, dict]], notes: list[str],
                     meteor=None) -> dict[str, tuple[float, list]]:
    if not java_available():
        notes.append(JAVA_MISSING_NOTE)
        return {}
    pair_index: dict[tuple[str, str], int] = {}
    pairs: list[tuple[list[str], str]] = []
    groups: list[list[int]] = []
    for gts, res in per_set.values():
        group = []
        for image, (hyp,) in res.items():
            key = (image, hyp)
            if key not in pair_index:
                pair_index[key] = len(pairs)
                pairs.append(([_meteor_safe(r) for r in gts[image]], _meteor_safe(hyp)))
            group.append(pair_index[key])
        groups.append(group)
    try:
        results = _meteor_many(pairs, groups, meteor)
    except Exception as exc:  # noqa: BLE001 - a broken JRE/jar must not take the other metrics down
        notes.append(f"METEOR skipped: the METEOR subprocess failed ({type(exc).__name__}: {exc})")
        return {}
    return dict(zip(per_set, results))


def _score_one(gts: dict, res: dict, wanted: list[str], meteor: tuple[float, list] | None,
               notes: list[str], clock: dict, pair: dict[str, list[float]]) -> Scores:
    """One set's Scores; `pair` holds metrics already scored per distinct pair (see `_pair_scores`)."""
    import numpy as np
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    images = list(res)
    table = ScoreTable(images)
    store = table.store

    def timed(stage: str, t0: float) -> None:
        clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    if any(m in wanted for m in BLEU_NAMES):
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(BLEU_NAMES):
            if name in wanted:
                store(name, score[n], scores[n])
    timed("BLEU", t0)
    if meteor is not None:
        store("METEOR", *meteor)
    t0 = time.perf_counter()
    if "ROUGE-L" in pair:
        store("ROUGE-L", np.mean(np.array(pair["ROUGE-L"])), pair["ROUGE-L"])
    elif "ROUGE-L" in wanted:
        store("ROUGE-L", *Rouge().compute_score(gts, res))
    timed("ROUGE-L", t0)
    t0 = time.perf_counter()
    if "CIDEr-D" in wanted:
        if not any(c.split() for caps in gts.values() for c in caps):
            store("CIDEr-D", 0.0, [0.0] * len(images))
            notes.append("CIDEr-D is 0: no reference caption has any word after tokenisation")
        elif "CIDEr-D" in pair:
            store("CIDEr-D", np.mean(np.array(pair["CIDEr-D"])), pair["CIDEr-D"])
        else:
            store("CIDEr-D", *Cider().compute_score(gts, res))
        if len(images) == 1:
            notes.append("CIDEr-D uses idf over the scored images: with a single image it is always 0")
    timed("CIDEr-D", t0)
    return table.scores(wanted, notes)
