"""Per-word evidence: three maps of where a word's evidence lies, and deletion curves that test each map.

Attention is not explanation: α_t says where the decoder looked, not what its choice depended on. For one
word (position t of a caption, same prefix, teacher-forced) this module computes on the encoder's grid:

* the model's attention α_t;
* gradient saliency: grad × input of log p(word) with respect to the (L, C) feature map, summed over
  channels: one value per region;
* occlusion sensitivity: the drop in p(word) when a cell (or block of cells) is greyed out in the image and
  the image re-encoded (in batches);

and deletion curves: regions are removed one at a time in the order a map ranks them, the word is
re-scored after each removal, and the area under p(word) against the share removed says how well the map
ranks what matters (lower = the word loses its evidence sooner = a more faithful map). Random orders over
several seeds are the chance baseline. Two deletion spaces:

* feature space: a removed region's feature vector becomes the image's mean feature. Nothing is
  re-encoded, and every projection the decoder applies to a region is linear, so they are computed once
  per image and mixed per row (`core.masked_scorer.MaskedScorer`): this is what makes a whole split affordable on a CPU;
* pixel space: the removed cells are painted grey (`core.analysis.OCCLUSION_FILL`) and the image is
  re-encoded, testing the whole pipeline where receptive fields overlap. Identical masks (the first and
  last point of every curve, random orders shared by all words of a caption) are encoded once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from core import analysis
from core.errors import ConfigError
from core.masked_scorer import MaskedScorer, log_softmax_banned, single_threaded

METHODS = ("attention", "saliency", "occlusion", "random")
SPACES = ("feature", "pixel")
DEFAULT_SEEDS = 5


@dataclass(frozen=True)
class Caption:
    """A caption as the teacher-forced scorer sees it: `targets` are the tokens to predict (words, then <end>
    when the caption finished), `inputs` the tokens fed before each ([<start>] + targets[:-1])."""
    targets: list[int]
    start_id: int = 1
    banned: tuple[int, ...] = (0, 1)

    @property
    def inputs(self) -> list[int]:
        return [self.start_id] + self.targets[:-1]

    def __len__(self) -> int:
        return len(self.targets)

    def check_position(self, position: int) -> int:
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise ConfigError(f"word_index must be an integer, got {position!r}")
        if not 0 <= int(position) < len(self.targets):
            raise ConfigError(f"word_index {position} is outside the caption (0..{len(self.targets) - 1})")
        return int(position)


def caption_of(captioner, hypothesis) -> Caption:
    """The scored tokens of a decoded hypothesis (its words, plus <end> when it finished)."""
    v = captioner.vocab
    targets = list(hypothesis.token_ids) + ([v.end_id] if hypothesis.finished else [])
    if not targets:
        raise ConfigError("the caption has no tokens to explain")
    return Caption(targets, v.start_id, (v.pad_id, v.start_id, v.unk_id))


def check_grid_index(region: int, num_regions: int) -> int:
    """A region index of the flattened grid, refused by name when out of range."""
    if isinstance(region, bool) or not isinstance(region, (int, np.integer)) or not 0 <= int(region) < num_regions:
        raise ConfigError(f"region index {region!r} is outside the grid (0..{num_regions - 1})")
    return int(region)


# -- teacher forcing over many feature maps -------------------------------------------------------------------

def teacher_forced_logprobs(model, features: Tensor, caption: Caption) -> Tensor:
    """(N, T) log p(target_t) for N feature maps (N, L, C), every row the same caption (model.step path)."""
    N = features.shape[0]
    state = model.init_state(features)
    out = []
    for prev, target in zip(caption.inputs, caption.targets):
        tokens = torch.full((N,), prev, dtype=torch.long, device=features.device)
        logits, _, _, state = model.step(tokens, state)
        out.append(log_softmax_banned(logits, caption.banned)[:, target])
    return torch.stack(out, 1)


# -- the three maps ----------------------------------------------------------------------------------------------

def saliency_maps(model, features: Tensor, caption: Caption) -> np.ndarray:
    """(T, L) grad × input of log p(target_t) w.r.t. the feature map, summed over channels, for every t.

    One batched forward and backward through `MaskedScorer`: row t carries word t's objective, and the
    derivative by each region's scale a_i is exactly Σ_c a_ic ∂log p/∂a_ic.
    """
    T, L = len(caption), features.shape[0]
    was_training = model.training
    model.eval()
    try:
        with single_threaded(), torch.enable_grad():
            scorer = MaskedScorer(model, features.detach().float(), caption)
            own = torch.ones(T, L, device=features.device, requires_grad=True)
            logp = scorer.logprobs_mixed(own, torch.zeros(T, L, device=features.device), torch.arange(T))
            (grad,) = torch.autograd.grad(logp.diagonal().sum(), own)
    finally:
        model.train(was_training)
    return grad.detach().float().cpu().numpy()


def cells_mask(cells: Sequence[int] | np.ndarray, grid: int) -> np.ndarray:
    mask = np.zeros(grid * grid, dtype=bool)
    mask[np.asarray(cells, dtype=int)] = True
    return mask


def paint_cells(image: Image.Image, removed: np.ndarray, grid: int,
                fill: tuple[int, int, int] = analysis.OCCLUSION_FILL) -> Image.Image:
    """A copy of the image with every removed cell (flattened row-major grid) painted `fill`."""
    out = image.convert("RGB").copy()
    for index in np.flatnonzero(removed):
        r, c = divmod(int(index), grid)
        x0, y0, x1, y1 = analysis.region_pixels((r, c, r + 1, c + 1), grid, out.size)
        if x1 > x0 and y1 > y0:
            out.paste(tuple(int(v) for v in fill), (x0, y0, x1, y1))
    return out


def encode_masks(captioner, image: Image.Image, masks: np.ndarray, *, batch_size: int = 16) -> Tensor:
    """Features (N, L, C) of the image with each mask's cells greyed out, re-encoded `batch_size` at a time."""
    grid, parts = captioner.grid, []
    base = image.convert("RGB")
    for start in range(0, len(masks), max(1, int(batch_size))):
        chunk = [paint_cells(base, m, grid) for m in masks[start:start + batch_size]]
        parts.append(captioner.encode(chunk).float())
    return torch.cat(parts) if parts else torch.zeros(0)


def occlusion_maps(captioner, image: Image.Image, caption: Caption, *, block: int = 1,
                   batch_size: int = 16) -> np.ndarray:
    """(T, L): drop in p(target_t) when the block x block tile holding each cell is greyed out and the
    image re-encoded. Tiles cover the grid without overlap; every cell of a tile gets the tile's drop.
    All words of the caption come from the same re-encodes."""
    grid = captioner.grid
    block = int(block)
    if not 1 <= block <= grid:
        raise ConfigError(f"occlusion block must be 1..{grid} cells, got {block}")
    tiles = [(r, c) for r in range(0, grid, block) for c in range(0, grid, block)]
    masks = np.zeros((len(tiles) + 1, grid * grid), dtype=bool)      # row 0: the image as it is
    for k, (r, c) in enumerate(tiles, start=1):
        rows, cols = np.arange(r, min(r + block, grid)), np.arange(c, min(c + block, grid))
        masks[k, (rows[:, None] * grid + cols[None, :]).ravel()] = True
    feats = encode_masks(captioner, image, masks, batch_size=batch_size)
    with torch.inference_mode():
        probs = teacher_forced_logprobs(captioner.model, feats.to(captioner.device), caption).exp().cpu().numpy()
    drops = probs[0][None, :] - probs[1:]                               # (tiles, T)
    out = np.zeros((len(caption), grid * grid), dtype=np.float32)
    for k in range(len(tiles)):
        out[:, masks[k + 1]] = drops[k][:, None]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (average ranks for ties); NaN when either map is constant."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ConfigError(f"maps differ in size: {a.size} vs {b.size} regions")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def map_correlations(maps: dict[str, np.ndarray]) -> dict[str, float]:
    names = list(maps)
    return {f"{x} vs {y}": spearman(maps[x], maps[y]) for i, x in enumerate(names) for y in names[i + 1:]}


# -- deletion curves ------------------------------------------------------------------------------------------------

def ranking(scores: np.ndarray) -> np.ndarray:
    """Regions, most important first (ties keep grid order, so the result is deterministic)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def random_orders(num_regions: int, seeds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_regions) for _ in range(seeds)]) if seeds else np.zeros((0, num_regions), int)


def deletion_points(num_regions: int, step: int = 1) -> np.ndarray:
    """How many regions are removed at each point of a curve: 0, step, 2*step, ..., num_regions."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= num_regions:
        raise ConfigError(f"deletion step must be 1..{num_regions} regions, got {step!r}")
    return np.unique(np.r_[np.arange(0, num_regions, int(step)), num_regions])


def deletion_masks(order: np.ndarray, step: int = 1) -> np.ndarray:
    """(points, L) bool: row j has the first deletion_points(L, step)[j] regions of `order` removed."""
    L = len(order)
    removed_at = np.empty(L, dtype=int)
    removed_at[np.asarray(order)] = np.arange(L)             # rank of each region in the order
    return removed_at[None, :] < deletion_points(L, step)[:, None]


def area_under(curve: np.ndarray, fractions: np.ndarray | None = None) -> float:
    """Trapezoid area of p(word) over the share of regions removed (0..1); equal steps by default."""
    y = np.asarray(curve, dtype=np.float64)
    x = np.linspace(0.0, 1.0, len(y)) if fractions is None else np.asarray(fractions, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


@dataclass
class DeletionCurves:
    """p(word) after removing the first k regions of each ranking, k = 0..L."""
    word: str
    space: str
    fractions: np.ndarray                      # (L + 1,) share of the regions removed
    curves: dict[str, np.ndarray]              # method -> (L + 1,) p(word); "random" is the mean over seeds
    random_curves: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))   # (seeds, L + 1)

    @property
    def auc(self) -> dict[str, float]:
        return {name: area_under(c, self.fractions) for name, c in self.curves.items()}

    @property
    def random_band(self) -> tuple[float, float]:
        """Lowest and highest AUC over the random seeds."""
        aucs = [area_under(c, self.fractions) for c in self.random_curves]
        return (min(aucs), max(aucs)) if aucs else (float("nan"), float("nan"))

    def frame(self) -> pd.DataFrame:
        """Long form for a chart: share removed, method, p(word) (+ the random band's low/high)."""
        rows = [{"removed": f, "method": name, "p": float(p)} for name, c in self.curves.items()
                for f, p in zip(self.fractions, c)]
        return pd.DataFrame(rows)

    def verdict(self) -> str:
        return verdict_line(self.auc, self.random_band, float(self.curves["attention"][0]))


def verdict_line(auc: dict[str, float], band: tuple[float, float], p_word: float) -> str:
    """One plain sentence: attention against chance, then against the other maps (lower AUC = better)."""
    tol = 0.02 * max(p_word, 1e-6)
    att = auc["attention"]
    low, high = band
    if att < low - tol:
        chance = "better than chance"
    elif att > high + tol:
        chance = "worse than chance"
    else:
        chance = "no better than chance"
    names = {"saliency": "gradient saliency", "occlusion": "occlusion"}
    comparisons = []
    for key, label in names.items():
        if key in auc:
            other = auc[key]
            relation = "as well as" if abs(att - other) <= tol else "better than" if att < other else "worse than"
            comparisons.append(f"{relation} {label}")
    tail = (", and " + " and ".join(comparisons)) if comparisons else ""
    return f"Attention ranks the regions that matter {chance}{tail} (lower area = the word loses its evidence sooner)."


Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""score(masks (R, L) bool, wanted (R, T) bool) -> (R, T) log p of each caption token with the mask's regions
removed, at least where wanted (NaN or a value elsewhere)."""


def deletion_scores(score: Scorer, orders: dict[str, np.ndarray], random: np.ndarray, position: int, *,
                    step: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """p(word at `position`) along the deletion masks of each named order and of each random order.

    Returns ({name: (points,) p}, (seeds, points) p).
    """
    orders_list = list(orders.values()) + list(random)
    masks = np.concatenate([deletion_masks(o, step) for o in orders_list])
    wanted = np.zeros((len(masks), position + 1), dtype=bool)
    wanted[:, position] = True
    lp = score(masks, wanted)[:, position]
    p = np.exp(lp).reshape(len(orders_list), -1)
    return {name: p[i] for i, name in enumerate(orders)}, p[len(orders):]


def distinct_masks(masks: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct masks, the positions any copy of each wants, the index of each input row's distinct mask).
    Deletion curves repeat masks a lot: every curve starts with none and ends with all regions removed,
    and two words' or two methods' top-k (or bottom-k) sets often agree."""
    packed = np.packbits(masks, axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    merged = np.zeros((len(first), wanted.shape[1]), dtype=bool)
    np.logical_or.at(merged, inverse, wanted)
    return masks[first], merged, inverse


def feature_scorer(model, features: Tensor, caption: Caption) -> Scorer:
    """Feature-space deletion through `MaskedScorer`; each distinct mask is run once, scored at every
    position any of its copies wants, and only as far as the last of them."""
    scorer = MaskedScorer(model, features.to(next(model.parameters()).device), caption)
    T = len(caption)

    def score(masks: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        wanted = np.pad(wanted, ((0, 0), (0, T - wanted.shape[1])))
        unique, merged, inverse = distinct_masks(np.asarray(masks, dtype=bool), wanted)
        with single_threaded(), torch.inference_mode():
            lp = scorer.logprobs(torch.from_numpy(unique), wanted=torch.from_numpy(merged)).numpy()
        return lp[inverse]
    return score


def pixel_scorer(captioner, image: Image.Image, caption: Caption, *, batch_size: int = 16) -> Scorer:
    """Scores masks by greying the cells out and re-encoding; each distinct mask is encoded once."""
    def score(masks: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(masks, axis=0, return_inverse=True)
        feats = encode_masks(captioner, image, unique, batch_size=batch_size)
        with torch.inference_mode():
            lp = teacher_forced_logprobs(captioner.model, feats.to(captioner.device), caption).float().cpu().numpy()
        return lp[inverse.reshape(-1)]
    return score
