"""Attention analysis: heatmaps over the image, attention entropy, teacher-forced scoring and occlusion tests.

The decoder attends over a grid x grid map of encoder regions (7x7 for 224 px inputs). Preprocessing is a
no-crop resize, so region (r, c) is the cell [c*W/grid, (c+1)*W/grid) x [r*H/grid, (r+1)*H/grid) of the
whole original image. Every picture drawn here is bounded by core.images.display_box.

Attention maps show where the model looked, not what it used. The occlusion test checks the second: grey
out the cells a word attended to, re-encode, and measure how much p(that word | same prefix) falls.
`random_region_baseline` gives the drop for random cells of the same size: a real effect vs. noise.

Pure functions over numpy / PIL / matplotlib (no Streamlit), so pages, CLIs and tests share them.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from core.decoding import DecodingConfig, Hypothesis
from core.decoding_rules import log_probs
from core.errors import ConfigError
from core.images import DISPLAY_FILL, DisplayBox, display_box, letterbox
from core.logits_rules import LogitsRules
from core.text import END, END_ID, PAD_ID, START_ID, UNK_ID

OCCLUSION_FILL = (124, 116, 104)   # ImageNet mean colour: "no information" rather than a black/white edge


# -- heatmaps ------------------------------------------------------------------------------------------

def _grid_map(weights: np.ndarray, grid: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    if grid < 1 or w.size != grid * grid:
        raise ConfigError(f"attention has {w.size} weights, expected grid*grid = {grid}*{grid} = {grid * grid}")
    return w.reshape(grid, grid)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a flat map (no preference anywhere) becomes all zeros."""
    lo, hi = float(x.min()), float(x.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def upsample_attention(weights: np.ndarray, grid: int, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """(L,) attention weights -> (H, W) float32 map in [0, 1] for an image of `size` = (W, H).

    smooth=True resizes the grid bicubically (the soft blobs of Xu et al.'s figures); smooth=False keeps
    nearest-neighbour blocks, which shows honestly what the model can resolve: one value per cell.
    Min-max normalised per map, so maps of different words are compared by shape, not by peak height.
    """
    W, H = int(size[0]), int(size[1])
    if W < 1 or H < 1:
        raise ConfigError(f"heatmap size must be positive, got {size}")
    m = _grid_map(weights, grid)
    resample = Image.BICUBIC if smooth else Image.NEAREST
    up = np.asarray(Image.fromarray(_normalise(m), mode="F").resize((W, H), resample), dtype=np.float32)
    return _normalise(np.clip(up, 0.0, 1.0))   # bicubic overshoots a little: clip, then renormalise


def _colormap(cmap: str):
    import matplotlib

    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ConfigError(f"unknown matplotlib colormap {cmap!r} (e.g. 'jet', 'viridis', 'magma')") from None


def overlay_heatmap(image: Image.Image, heat: np.ndarray, *, opacity: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Alpha-blend a colour-mapped [0, 1] heatmap over the image (output size = image size; pages show
    `attention_overlay`, which bounds it)."""
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"opacity must be in [0, 1], got {opacity}")
    base = image.convert("RGB")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (base.height, base.width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(base.size, Image.BILINEAR), dtype=np.float32)
    colours = _colormap(cmap)(np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - opacity) * np.asarray(base, dtype=np.float32) + opacity * colours
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _labels(words: Sequence[str], steps: int) -> list[str]:
    """Words for the attention rows; the caller may leave out the final <end> row's label."""
    words = list(words)
    if steps == len(words) + 1:
        words.append(END)
    if steps != len(words):
        raise ConfigError(f"{len(words)} words but {steps} attention rows (expected equal, or one more row "
                          "for <end>)")
    return words


def attention_overlay(image: Image.Image, weights: np.ndarray, grid: int, box: DisplayBox | None = None, *,
                      opacity: float = 0.5, cmap: str = "jet", smooth: bool = True, fill=DISPLAY_FILL) -> Image.Image:
    """One word's heatmap over the image in `box` (default display_box(image.size)); padding is not heated."""
    box = box or display_box(image.size)
    base = image.convert("RGB").resize(box.content_size, Image.BILINEAR)     # no-op copy at the same size
    heat = upsample_attention(weights, grid, base.size, smooth)
    return letterbox(overlay_heatmap(base, heat, opacity=opacity, cmap=cmap), box, fill)


TITLE_HEIGHT = 26
GAP = 4


def _steps_by_regions(attention: np.ndarray) -> np.ndarray:
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 2 or attention.shape[0] == 0:
        raise ConfigError(f"attention must be a non-empty (steps, regions) array, got shape {attention.shape}")
    return attention


def attention_grid(image: Image.Image, words: list[str], attention: np.ndarray, grid: int, *, cols: int = 5,
                   opacity: float = 0.5, cmap: str = "jet", smooth: bool = True,
                   panel_width: int = 224) -> Image.Image:
    """One panel per word (the image with that word's attention overlaid, the word above it).

    Layout: panels of display_box(image.size, panel_width) (bounded: a 1x1024 strip is letterboxed) plus
    TITLE_HEIGHT, `min(cols, n)` per row, GAP pixels between panels, none around the edge, on white.
    """
    attention = _steps_by_regions(attention)
    if cols < 1:
        raise ConfigError(f"cols must be >= 1, got {cols}")
    labels = _labels(words, attention.shape[0])
    n = len(labels)
    box = display_box(image.size, panel_width, panels=n)
    pw, ph = box.canvas
    ncols, nrows = min(cols, n), math.ceil(n / cols)
    canvas = Image.new("RGB", (ncols * pw + (ncols - 1) * GAP, nrows * (ph + TITLE_HEIGHT) + (nrows - 1) * GAP),
                       "white")
    draw, font = ImageDraw.Draw(canvas), _font(16)
    for i, (label, row) in enumerate(zip(labels, attention)):
        x, y = (i % ncols) * (pw + GAP), (i // ncols) * (ph + TITLE_HEIGHT + GAP)
        canvas.paste(attention_overlay(image, row, grid, box, opacity=opacity, cmap=cmap, smooth=smooth,
                                       fill=(255, 255, 255)), (x, y + TITLE_HEIGHT))
        draw.text((x + pw // 2, y + TITLE_HEIGHT // 2), label, fill="black", font=font, anchor="mm")
    return canvas


def image_to_png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def attention_gif_bytes(image: Image.Image, words: list[str], attention: np.ndarray, grid: int, *,
                        ms_per_word: int = 700, opacity: float = 0.5, cmap: str = "jet", smooth: bool = True,
                        width: int = 320, loop: int = 0) -> bytes:
    """Animated GIF, one frame per word: the word's attention over the image, the caption so far below it
    (earlier words grey, the current one white), so repeated words still make distinct frames."""
    attention = _steps_by_regions(attention)
    if ms_per_word < 20:
        raise ConfigError(f"ms_per_word must be >= 20 (GIF timing resolution), got {ms_per_word}")
    labels = _labels(words, attention.shape[0])
    box = display_box(image.size, width, panels=len(labels))
    w, h = box.canvas
    bar, font = 30, _font(16)
    frames = []
    for i, row in enumerate(attention):
        frame = Image.new("RGB", (w, h + bar), (20, 20, 20))
        frame.paste(attention_overlay(image, row, grid, box, opacity=opacity, cmap=cmap, smooth=smooth,
                                      fill=(20, 20, 20)), (0, 0))
        draw = ImageDraw.Draw(frame)
        prefix = " ".join(labels[:i]) + (" " if i else "")
        word = labels[i]
        # keep the current word visible: drop words from the left of the prefix until the line fits
        while prefix and draw.textlength(prefix + word, font=font) > w - 12:
            prefix = "… " + prefix.split(" ", 2)[-1] if prefix.count(" ") > 1 else ""
        x = 6
        draw.text((x, h + bar // 2), prefix, fill=(150, 150, 150), font=font, anchor="lm")
        x += draw.textlength(prefix, font=font)
        draw.text((x, h + bar // 2), word, fill="white", font=font, anchor="lm")
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_word,
                   loop=loop, disposal=1, optimize=False)
    return buffer.getvalue()


# -- statistics of attention ----------------------------------------------------------------------------

def attention_entropy(attention: np.ndarray) -> np.ndarray:
    """Entropy in bits of each attention row (T, L) -> (T,): 0 = one region, log2(L) = spread evenly."""
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ConfigError(f"attention must be (steps, regions), got shape {a.shape}")
    a = np.clip(a, 0.0, None)
    a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0)), 0.0)
    return (-terms.sum(axis=1)).astype(np.float32)


def max_entropy(num_regions: int) -> float:
    """Entropy of uniform attention over `num_regions` regions, in bits."""
    return math.log2(num_regions) if num_regions > 0 else 0.0


def peak_region(weights: np.ndarray, grid: int) -> tuple[int, int]:
    """(row, col) of the most-attended cell (row-major, as the encoder flattens its map)."""
    m = _grid_map(weights, grid)
    r, c = divmod(int(np.argmax(m)), grid)
    return r, c


def region_mass(weights: np.ndarray, grid: int, region: tuple[int, int, int, int]) -> float:
    """Share of the attention inside region (row0, col0, row1, col1), end-exclusive."""
    m = _grid_map(weights, grid)
    r0, c0, r1, c1 = _check_region(region, grid)
    return float(m[r0:r1, c0:c1].sum() / max(float(m.sum()), 1e-30))


# -- teacher-forced scoring -------------------------------------------------------------------------------

@dataclass
class TokenScores:
    token_ids: list[int]        # the scored tokens: the words, then <end> when it was scored
    logprobs: np.ndarray        # (T,) log p(token_t | image, tokens before t)
    attention: np.ndarray       # (T, L) α used to predict each token
    betas: np.ndarray           # (T,)

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logprobs)

    @property
    def logprob(self) -> float:
        return float(self.logprobs.sum(dtype=np.float64))


def score_tokens(model, features: torch.Tensor, token_ids: list[int], *, include_end: bool = True,
                 score_unk: bool = False, rules: LogitsRules = LogitsRules()) -> TokenScores:
    """Log-probabilities the model gives a fixed caption (teacher forcing through `model.step`).

    `token_ids` are the words (a leading <start> / trailing <end> are tolerated and stripped). The
    distribution excludes the never-generated tokens, as decoding does, so for the decoder's own caption
    this reproduces its `token_logprobs`. include_end=False scores the words only (an unfinished caption).
    score_unk=True scores a typed <unk> target against the distribution with <unk> in it (it has a
    probability then, instead of log 0). `rules` (a decoding setting's `LogitsRules`) reshape each step's
    distribution by the words before it, as decoding does, so a caption decoded with a repetition penalty gets
    its own log-probs back; their constraints are not applied (they never change a log-prob).
    """
    ids = [int(t) for t in token_ids]
    if ids and ids[0] == START_ID:
        ids = ids[1:]
    if ids and ids[-1] == END_ID:
        ids = ids[:-1]
    targets = ids + ([END_ID] if include_end else [])
    if not targets:
        raise ConfigError("score_tokens: nothing to score (no words and include_end=False)")
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3 or features.shape[0] != 1:
        raise ConfigError(f"score_tokens: features must be (L, C) or (1, L, C), got {tuple(features.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = model.init_state(features.to(device=device, dtype=torch.float32))
            inputs = [START_ID] + targets[:-1]
            logprobs, alphas, betas = [], [], []
            for t, (prev, target) in enumerate(zip(inputs, targets)):
                logits, alpha, beta, state = model.step(torch.tensor([prev], device=device), state)
                logits = rules.reshape(logits, torch.tensor([targets[:t]], dtype=torch.long, device=device).view(1, t))
                if score_unk and target == UNK_ID:
                    logits = logits.clone()
                    logits[:, [PAD_ID, START_ID]] = float("-inf")
                    logprobs.append(torch.log_softmax(logits, dim=-1)[0, target])
                else:
                    logprobs.append(log_probs(logits)[0, target])
                alphas.append(alpha[0])
                betas.append(beta[0, 0])
            lp = torch.stack(logprobs).float().cpu().numpy()
            att = torch.stack(alphas).float().cpu().numpy()
            bet = torch.stack(betas).float().cpu().numpy()
    finally:
        model.train(was_training)
    return TokenScores(targets, lp, att, bet)


# -- occlusion ----------------------------------------------------------------------------------------------

def _check_region(region: Sequence[int], grid: int) -> tuple[int, int, int, int]:
    try:
        r0, c0, r1, c1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ConfigError(f"region must be (row0, col0, row1, col1), got {region!r}") from None
    if not (0 <= r0 < r1 <= grid and 0 <= c0 < c1 <= grid):
        raise ConfigError(f"region {region!r} is not a non-empty block of the {grid}x{grid} grid "
                          "(row0 < row1 <= grid, col0 < col1 <= grid; ends are exclusive)")
    return r0, c0, r1, c1


def region_pixels(region: tuple[int, int, int, int], grid: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grid cells (row0, col0, row1, col1), end-exclusive -> pixel box (x0, y0, x1, y1) of an image of size (W, H)."""
    r0, c0, r1, c1 = _check_region(region, grid)
    W, H = size
    return round(c0 * W / grid), round(r0 * H / grid), round(c1 * W / grid), round(r1 * H / grid)


def occlude(image: Image.Image, region: tuple[int, int, int, int], grid: int,
            fill: tuple[int, int, int] = OCCLUSION_FILL) -> Image.Image:
    """A copy of the image with grid cells rows row0..row1-1, cols col0..col1-1 painted `fill`.

    Cells are laid over the full image (preprocessing resizes without cropping), so the painted box is
    what the encoder sees as those regions.
    """
    out = image.convert("RGB").copy()
    x0, y0, x1, y1 = region_pixels(region, grid, out.size)
    if x1 > x0 and y1 > y0:
        out.paste(tuple(int(v) for v in fill), (x0, y0, x1, y1))
    return out


def best_block(weights: np.ndarray, grid: int, block: int = 2) -> tuple[int, int, int, int]:
    """The block x block window that contains the peak cell and holds the most attention."""
    m = _grid_map(weights, grid)
    block = max(1, min(int(block), grid))
    pr, pc = peak_region(weights, grid)
    best, best_mass = None, -1.0
    for r0 in range(max(0, pr - block + 1), min(pr, grid - block) + 1):
        for c0 in range(max(0, pc - block + 1), min(pc, grid - block) + 1):
            mass = float(m[r0:r0 + block, c0:c0 + block].sum())
            if mass > best_mass:
                best, best_mass = (r0, c0, r0 + block, c0 + block), mass
    return best


@dataclass
class OcclusionResult:
    region: tuple[int, int, int, int]      # grid cells (row0, col0, row1, col1), end-exclusive
    box: tuple[int, int, int, int]         # the same in pixels of `image`: (x0, y0, x1, y1)
    image: Image.Image                     # the occluded image
    word_index: int
    word: str
    prob_before: float                     # p(word | same prefix), original image
    prob_after: float                      # p(word | same prefix), occluded image
    attention_mass: float                  # share of the word's attention (original image) inside the region
    caption_before: str
    caption_after: str                     # re-decoded from the occluded image, same decoding settings
    logprobs_before: np.ndarray            # per token of the original caption (incl. <end> if finished)
    logprobs_after: np.ndarray             # the same tokens, teacher-forced on the occluded image
    hypothesis_after: Hypothesis | None = field(default=None, repr=False)

    @property
    def drop(self) -> float:
        """How much the occlusion lowered the word's probability (negative: it rose)."""
        return self.prob_before - self.prob_after


def _word_at(captioner, hypothesis: Hypothesis, word_index: int) -> str:
    n = len(hypothesis.token_ids)
    if 0 <= word_index < n:
        return captioner.vocab.itos[hypothesis.token_ids[word_index]]
    if word_index == n and hypothesis.finished:
        return END
    raise ConfigError(f"word_index {word_index} is outside the caption (0..{n - 1 + int(hypothesis.finished)})")


def occlusion_test(captioner, image: Image.Image, hypothesis: Hypothesis, word_index: int,
                   decoding: DecodingConfig, region: tuple[int, int, int, int] | None = None, *,
                   block: int = 2) -> OcclusionResult:
    """Does the word depend on what it attended to? Grey out a region, re-encode, re-score, re-decode.

    Default region: the `block` x `block` cells (2x2) containing the word's most-attended cell with the most
    attention (one 7x7 cell is often too small to matter: CNN receptive fields overlap). prob_before and
    prob_after are both teacher-forced on features encoded from `image` now, so the comparison is like
    for like even when `hypothesis` came from the original (larger) file.
    """
    grid = captioner.grid
    word = _word_at(captioner, hypothesis, word_index)
    if region is None:
        region = best_block(hypothesis.attention[word_index], grid, block)
    region = _check_region(region, grid)
    occluded = occlude(image, region, grid)
    feats = captioner.encode([image.convert("RGB"), occluded])
    before = score_tokens(captioner.model, feats[0], hypothesis.token_ids, include_end=hypothesis.finished)
    after = score_tokens(captioner.model, feats[1], hypothesis.token_ids, include_end=hypothesis.finished)
    hyp_after = captioner.decode(feats[1:2], decoding)[0][0]
    return OcclusionResult(
        region=region, box=region_pixels(region, grid, occluded.size), image=occluded, word_index=word_index,
        word=word, prob_before=float(np.exp(before.logprobs[word_index])),
        prob_after=float(np.exp(after.logprobs[word_index])),
        attention_mass=region_mass(hypothesis.attention[word_index], grid, region),
        caption_before=" ".join(captioner.words(hypothesis)), caption_after=" ".join(captioner.words(hyp_after)),
        logprobs_before=before.logprobs, logprobs_after=after.logprobs, hypothesis_after=hyp_after)


@dataclass
class BaselineResult:
    regions: list[tuple[int, int, int, int]]
    drops: list[float]                     # prob_before - prob_after for each random region
    prob_before: float

    @property
    def mean_drop(self) -> float:
        return float(np.mean(self.drops)) if self.drops else 0.0

    @property
    def std_drop(self) -> float:
        return float(np.std(self.drops)) if self.drops else 0.0


def random_region_baseline(captioner, image: Image.Image, hypothesis: Hypothesis, word_index: int, *,
                           size: tuple[int, int] = (2, 2), samples: int = 8, seed: int = 0,
                           exclude: tuple[int, int, int, int] | None = None,
                           batch_size: int = 8) -> BaselineResult:
    """Probability drop of the same word when random regions of `size` (rows, cols) cells are occluded.

    A real effect is a drop well above `mean_drop` (compare with `std_drop`); `exclude` leaves out the
    region under test. Positions are drawn without replacement (all of them if there are fewer).
    """
    grid = captioner.grid
    _word_at(captioner, hypothesis, word_index)
    h, w = int(size[0]), int(size[1])
    if not (1 <= h <= grid and 1 <= w <= grid):
        raise ConfigError(f"size must be within the {grid}x{grid} grid, got {size}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    positions = [(r, c, r + h, c + w) for r in range(grid - h + 1) for c in range(grid - w + 1)]
    if exclude is not None:
        positions = [p for p in positions if p != tuple(exclude)]
    rng = np.random.default_rng(seed)
    chosen = [positions[i] for i in rng.permutation(len(positions))[:samples]]
    base = image.convert("RGB")
    batch_size = max(1, int(batch_size))
    pending = [base] + [occlude(base, r, grid) for r in chosen]   # the original rides in the first batch
    probs: list[float] = []
    for start in range(0, len(pending), batch_size):
        for f in captioner.encode(pending[start:start + batch_size]):
            scored = score_tokens(captioner.model, f, hypothesis.token_ids, include_end=hypothesis.finished)
            probs.append(float(np.exp(scored.logprobs[word_index])))
    return BaselineResult(chosen, [probs[0] - p for p in probs[1:]], probs[0])
