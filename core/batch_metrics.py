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
from typing import Mapping, Sequence

from core.errors import DataError
from core.metrics import (BLEU_NAMES, JAVA_MISSING_NOTE, METEOR_TIMEOUT_BASE_S, METEOR_TIMEOUT_PER_IMAGE_S,
                          METRIC_NAMES, Scores, _make_meteor, _meteor_safe, _tokenize_all, _validate,
                          java_available)


def _meteor_many(pairs: list[tuple[list[str], str]], groups: list[list[int]]) -> list[tuple[float, list[float]]]:
    """One METEOR process: statistics of each (references, hypothesis) pair, then an aggregate per group of
    pair indices. Raises on a dead or stuck jar (a watchdog kills it), so the caller can skip METEOR."""
    meteor = _make_meteor()
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
                       metrics: Sequence[str] = METRIC_NAMES, tokenizer: str = "ptb") -> dict[str, Scores]:
    """Per set name, the Scores of that set's captions (image -> caption) against `references`.

    Same rules as `score_captions`: only the images of a set are scored, METEOR is skipped with a note when
    Java is missing or the jar fails, and the fallback tokenizer is used (with a note) without Java.
    """
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

    per_set: dict[str, tuple[dict, dict]] = {}
    for name, (preds, refs, _) in checked.items():
        gts = {image: gts_all[image] for image in preds}
        res = {image: [tokenized[caption]] for image, caption in preds.items()}
        per_set[name] = (gts, res)
    meteor = _meteor_for_sets(per_set, common_notes) if "METEOR" in wanted else {}

    out: dict[str, Scores] = {}
    for name, (preds, refs, _) in checked.items():
        gts, res = per_set[name]
        notes = list(common_notes)
        unscored = len(set(map(str, references)) - set(preds))
        if unscored:
            notes.append(f"{unscored} image(s) with references but no prediction were not scored")
        out[name] = _score_one(gts, res, wanted, meteor.get(name), notes)
    return out


def _meteor_for_sets(per_set: dict[str, tuple[dict, dict]], notes: list[str]) -> dict[str, tuple[float, list]]:
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
        results = _meteor_many(pairs, groups)
    except Exception as exc:  # noqa: BLE001 - a broken JRE/jar must not take the other metrics down
        notes.append(f"METEOR skipped: the METEOR subprocess failed ({type(exc).__name__}: {exc})")
        return {}
    return dict(zip(per_set, results))


def _score_one(gts: dict, res: dict, wanted: list[str], meteor: tuple[float, list] | None,
               notes: list[str]) -> Scores:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    images = list(res)
    corpus: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {image: {} for image in images}

    def store(name: str, score: float, scores: Sequence[float]) -> None:
        corpus[name] = float(score)
        for image, value in zip(images, scores):
            per_image[image][name] = float(value)

    if any(m in wanted for m in BLEU_NAMES):
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(BLEU_NAMES):
            if name in wanted:
                store(name, score[n], scores[n])
    if meteor is not None:
        store("METEOR", *meteor)
    if "ROUGE-L" in wanted:
        store("ROUGE-L", *Rouge().compute_score(gts, res))
    if "CIDEr-D" in wanted:
        if not any(c.split() for caps in gts.values() for c in caps):
            store("CIDEr-D", 0.0, [0.0] * len(images))
            notes.append("CIDEr-D is 0: no reference caption has any word after tokenisation")
        else:
            store("CIDEr-D", *Cider().compute_score(gts, res))
        if len(images) == 1:
            notes.append("CIDEr-D uses idf over the scored images: with a single image it is always 0")
    ordered = {m: corpus[m] for m in wanted if m in corpus}
    per_image = {image: {m: values[m] for m in wanted if m in values} for image, values in per_image.items()}
    return Scores(corpus=ordered, per_image=per_image, notes=notes)
