"""Faithfulness of one caption, word by word: the three maps, their rank correlations, deletion curves.

The Attention page shows `word_evidence` for the chosen word; `python -m core.faithfulness` runs
`caption_faithfulness` over every word of a split. Both build on `core.saliency`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core import saliency
from core.decoding import Hypothesis
from core.errors import ConfigError
from core.saliency import DeletionCurves


@dataclass
class WordEvidence:
    word: str
    word_index: int
    maps: dict[str, np.ndarray]          # attention, saliency, occlusion: (L,) each, on the encoder grid
    correlations: dict[str, float]       # "attention vs saliency" -> Spearman's rho
    deletion: DeletionCurves


def check_space(space: str) -> str:
    if space not in saliency.SPACES:
        raise ConfigError(f"deletion space must be one of {', '.join(saliency.SPACES)}, got {space!r}")
    return space


def _scorer(captioner, features: torch.Tensor, caption: saliency.Caption, space: str, image: Image.Image | None,
            batch_size: int) -> saliency.Scorer:
    if check_space(space) == "feature":
        return saliency.feature_scorer(captioner.model, features, caption)
    if image is None:
        raise ConfigError("pixel-space deletion needs the image (it is greyed out and re-encoded)")
    return saliency.pixel_scorer(captioner, image, caption, batch_size=batch_size)


def _word(captioner, caption: saliency.Caption, position: int) -> str:
    token = caption.targets[position]
    return "<end>" if token == captioner.vocab.end_id else captioner.vocab.itos[token]


def word_evidence(captioner, image: Image.Image, features: torch.Tensor, hypothesis: Hypothesis,
                  word_index: int, *, space: str = "feature", seeds: int = saliency.DEFAULT_SEEDS,
                  step: int = 1, seed: int = 0, block: int = 1, occlusion: np.ndarray | None = None,
                  saliency_maps: np.ndarray | None = None, batch_size: int = 16) -> WordEvidence:
    """Everything the page shows for one word. `occlusion` / `saliency_maps` ((T, L), all words) may be
    passed in when already computed for this caption (they do not depend on the word chosen)."""
    caption = saliency.caption_of(captioner, hypothesis)
    t = caption.check_position(word_index)
    if seeds < 1:
        raise ConfigError(f"random seeds must be >= 1, got {seeds}")
    features = features.float().to(captioner.device)
    sal = saliency.saliency_maps(captioner.model, features, caption) if saliency_maps is None else saliency_maps
    occ = saliency.occlusion_maps(captioner, image, caption, block=block, batch_size=batch_size) \
        if occlusion is None else occlusion
    maps = {"attention": np.asarray(hypothesis.attention[t], dtype=np.float32), "saliency": sal[t], "occlusion": occ[t]}
    L = maps["attention"].size
    orders = {name: saliency.ranking(m) for name, m in maps.items()}
    random = saliency.random_orders(L, seeds, seed)
    score = _scorer(captioner, features, caption, space, image, batch_size)
    named, rand = saliency.deletion_scores(score, orders, random, t, step=step)
    fractions = saliency.deletion_points(L, step) / L
    curves = {**named, "random": rand.mean(0)}
    return WordEvidence(_word(captioner, caption, t), t, maps, saliency.map_correlations(maps),
                        DeletionCurves(_word(captioner, caption, t), space, fractions, curves, rand))


def caption_faithfulness(captioner, features: torch.Tensor, hypothesis: Hypothesis, *, space: str = "feature",
                         image: Image.Image | None = None, seeds: int = 3, step: int = 1, seed: int = 0,
                         batch_size: int = 16) -> list[dict]:
    """One row per scored token (words, then <end>): p(word) and the deletion AUC of attention, gradient
    saliency and random order (mean over `seeds` orders, with their lowest / highest)."""
    caption = saliency.caption_of(captioner, hypothesis)
    features = features.float().to(captioner.device)
    T, L = len(caption), features.shape[0]
    sal = saliency.saliency_maps(captioner.model, features, caption)
    score = _scorer(captioner, features, caption, space, image, batch_size)
    fractions = saliency.deletion_points(L, step) / L
    points = len(fractions)
    random = saliency.random_orders(L, seeds, seed)
    orders = [(t, name, saliency.ranking(m[t])) for t in range(T)
              for name, m in (("attention", hypothesis.attention), ("saliency", sal))]
    # one request: random orders at every word (they do not depend on it), each named order at its word
    masks = np.concatenate([saliency.deletion_masks(o, step) for o in list(random) + [o for _, _, o in orders]])
    wanted = np.zeros((len(masks), T), dtype=bool)
    wanted[: len(random) * points] = True
    named_at = np.repeat([t for t, _, _ in orders], points)
    wanted[len(random) * points + np.arange(len(named_at)), named_at] = True
    p = np.exp(score(masks, wanted))
    rand_all = p[: len(random) * points].reshape(len(random), points, T)             # (seeds, points, T)
    p_named = p[len(random) * points + np.arange(len(named_at)), named_at].reshape(len(orders), points)
    aucs: dict[tuple[int, str], float] = {(t, name): saliency.area_under(p_named[i], fractions)
                                          for i, (t, name, _) in enumerate(orders)}
    rows = []
    for t in range(T):
        rand_aucs = [saliency.area_under(rand_all[s, :, t], fractions) for s in range(len(random))]
        rows.append({"position": t, "word": _word(captioner, caption, t), "p_word": float(rand_all[0, 0, t]),
                     "auc_attention": aucs[(t, "attention")], "auc_saliency": aucs[(t, "saliency")],
                     "auc_random": float(np.mean(rand_aucs)), "auc_random_low": float(np.min(rand_aucs)),
                     "auc_random_high": float(np.max(rand_aucs))})
    return rows


def reference_caption_faithfulness(captioner, features: torch.Tensor, hypothesis: Hypothesis, *, seeds: int = 3,
                                   seed: int = 0) -> list[dict]:
    """`caption_faithfulness` in feature space, one region per point, the plain way: one backward through
    `model.step` per word for saliency, one masked feature map and one teacher-forced pass per curve point.
    Slow on purpose: what the fast path is tested against and `bench/` measures it against."""
    caption = saliency.caption_of(captioner, hypothesis)
    model, features = captioner.model, features.float().to(captioner.device)
    T, L = len(caption), features.shape[0]
    mean = features.mean(0)
    sal = []
    for t in range(T):
        with torch.enable_grad():
            x = features.clone().unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(saliency.teacher_forced_logprobs(model, x, caption)[0, t], x)
        sal.append((grad[0] * features).sum(1).cpu().numpy())
    random = saliency.random_orders(L, seeds, seed)
    fractions = saliency.deletion_points(L, 1) / L
    rows = []
    with torch.inference_mode():
        for t in range(T):
            curves = []
            for order in [saliency.ranking(hypothesis.attention[t]), saliency.ranking(sal[t]), *random]:
                curve = []
                for mask in saliency.deletion_masks(order):
                    masked = torch.where(torch.from_numpy(mask).to(features.device)[:, None], mean, features)
                    curve.append(float(saliency.teacher_forced_logprobs(model, masked[None], caption)[0, t].exp()))
                curves.append(np.array(curve))
            aucs = [saliency.area_under(c, fractions) for c in curves]
            rows.append({"position": t, "word": _word(captioner, caption, t), "p_word": float(curves[0][0]),
                         "auc_attention": aucs[0], "auc_saliency": aucs[1], "auc_random": float(np.mean(aucs[2:])),
                         "auc_random_low": float(np.min(aucs[2:])), "auc_random_high": float(np.max(aucs[2:]))})
    return rows
