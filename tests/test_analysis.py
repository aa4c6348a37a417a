"""Attention analysis: heatmaps, panels, GIFs, entropy, teacher-forced scoring, occlusion."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageSequence

from core.analysis import (GAP, OCCLUSION_FILL, TITLE_HEIGHT, attention_entropy, attention_gif_bytes,
                           attention_grid, best_block, image_to_png_bytes, max_entropy, occlude, occlusion_test,
                           attention_overlay, overlay_heatmap, peak_region, random_region_baseline, region_pixels,
                           score_tokens, upsample_attention)
from core.decoding import DecodingConfig
from core.errors import ConfigError

GRID = 7
L = GRID * GRID


def one_hot(row: int, col: int) -> np.ndarray:
    w = np.zeros(L, dtype=np.float32)
    w[row * GRID + col] = 1.0
    return w


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from core.captioner import Captioner
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def tiny_image(tiny_flickr):
    path = sorted((tiny_flickr / "images").glob("*.jpg"))[0]
    return Image.open(path).convert("RGB")


# -- heatmaps ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("smooth", [True, False])
def test_upsample_shape_range_and_peak_location(smooth):
    W, H = 140, 70
    heat = upsample_attention(one_hot(2, 5), GRID, (W, H), smooth=smooth)
    assert heat.shape == (H, W) and heat.dtype == np.float32
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 5 * W / GRID <= x < 6 * W / GRID and 2 * H / GRID <= y < 3 * H / GRID
    if not smooth:  # nearest blocks: exactly the cell is hot
        x0, y0, x1, y1 = region_pixels((2, 5, 3, 6), GRID, (W, H))
        inside = np.zeros_like(heat, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert np.all(heat[inside] == 1.0) and np.all(heat[~inside] == 0.0)


def test_upsample_rejects_wrong_region_count_and_flat_map_is_zero():
    with pytest.raises(ConfigError, match="49"):
        upsample_attention(np.ones(48), GRID, (10, 10))
    flat = upsample_attention(np.full(L, 1 / L), GRID, (21, 21))
    assert flat.shape == (21, 21) and np.all(flat == 0)


def test_overlay_opacity_extremes():
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    heat = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    assert np.array_equal(np.asarray(overlay_heatmap(image, heat, opacity=0.0)), np.asarray(image))
    full = np.asarray(overlay_heatmap(image, heat, opacity=1.0, cmap="gray"), dtype=int)
    assert abs(full[0, 0, 0] - 0) <= 1 and abs(full[-1, -1, 0] - 255) <= 1   # grey colormap of the heat itself
    with pytest.raises(ConfigError, match="colormap"):
        overlay_heatmap(image, heat, cmap="no-such-map")


# -- statistics -------------------------------------------------------------------------------------------

def test_entropy_uniform_one_hot_and_peak():
    att = np.stack([np.full(L, 1 / L), one_hot(3, 4), np.r_[np.full(2, 0.5), np.zeros(L - 2)]])
    ent = attention_entropy(att)
    assert ent.shape == (3,)
    assert ent[0] == pytest.approx(math.log2(L), abs=1e-5) == pytest.approx(max_entropy(L))
    assert ent[1] == pytest.approx(0.0, abs=1e-6)
    assert ent[2] == pytest.approx(1.0, abs=1e-5)
    assert peak_region(one_hot(3, 4), GRID) == (3, 4)


def test_best_block_contains_peak_and_most_mass():
    w = one_hot(0, 6) * 0.5
    w[1 * GRID + 5] = 0.3          # diagonal neighbour below-left of the top-right corner
    w[6 * GRID + 0] = 0.2
    r0, c0, r1, c1 = best_block(w, GRID, 2)
    assert (r0, c0, r1, c1) == (0, 5, 2, 7)


# -- panels and GIF -----------------------------------------------------------------------------------------

def test_attention_grid_has_one_panel_per_word(tiny_image):
    rng = np.random.default_rng(0)
    words = ["a", "red", "square", "on", "a", "white", "wall"]
    att = rng.dirichlet(np.ones(L), size=len(words) + 1).astype(np.float32)   # + the <end> row
    pw = 100
    ph = round(tiny_image.height * pw / tiny_image.width)
    grid_img = attention_grid(tiny_image, words, att, GRID, cols=5, panel_width=pw)
    panels, cols = len(words) + 1, 5
    rows = math.ceil(panels / cols)
    assert grid_img.size == (cols * pw + (cols - 1) * GAP, rows * (ph + TITLE_HEIGHT) + (rows - 1) * GAP)
    # fewer words than columns: a single row exactly as wide as the panels
    small = attention_grid(tiny_image, ["a", "red"], att[:2], GRID, cols=5, panel_width=pw)
    assert small.size == (2 * pw + GAP, ph + TITLE_HEIGHT)
    with pytest.raises(ConfigError, match="attention rows"):
        attention_grid(tiny_image, words[:3], att, GRID)
    png = image_to_png_bytes(small)
    assert Image.open(io.BytesIO(png)).size == small.size


def test_gif_has_one_frame_per_word(tiny_image):
    rng = np.random.default_rng(1)
    words = ["a", "red", "a", "red", "<end>"]    # repeats must still be separate frames
    att = rng.dirichlet(np.ones(L), size=len(words)).astype(np.float32)
    gif = Image.open(io.BytesIO(attention_gif_bytes(tiny_image, words, att, GRID, ms_per_word=300, width=120)))
    frames = list(ImageSequence.Iterator(gif))
    assert len(frames) == len(words)
    assert gif.info.get("duration") == 300


# -- teacher forcing and occlusion ------------------------------------------------------------------------------

@pytest.mark.parametrize("beam", [1, 3])
def test_score_tokens_reproduces_decoder_logprobs(captioner, tiny_image, beam):
    feats = captioner.encode([tiny_image])[0]
    hyp = captioner.decode(feats[None], DecodingConfig(beam_size=beam))[0][0]
    assert hyp.finished and hyp.token_ids
    scored = score_tokens(captioner.model, feats, hyp.token_ids)
    assert scored.token_ids == hyp.token_ids + [captioner.vocab.end_id]
    np.testing.assert_allclose(scored.logprobs, hyp.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(scored.attention, hyp.attention, atol=1e-5)
    np.testing.assert_allclose(scored.betas, hyp.betas, atol=1e-5)
    # a different caption gets a different (lower) score: the function really scores the tokens it is given
    other = score_tokens(captioner.model, feats[None], list(reversed(hyp.token_ids)))
    assert other.logprob < scored.logprob


def test_occlude_changes_only_the_region(tiny_image):
    region = (1, 2, 3, 5)
    out = occlude(tiny_image, region, GRID)
    assert out.size == tiny_image.size
    x0, y0, x1, y1 = region_pixels(region, GRID, tiny_image.size)
    before, after = np.asarray(tiny_image), np.asarray(out)
    inside = np.zeros(before.shape[:2], dtype=bool)
    inside[y0:y1, x0:x1] = True
    assert np.all(after[inside] == OCCLUSION_FILL)
    assert np.array_equal(after[~inside], before[~inside])
    with pytest.raises(ConfigError, match="region"):
        occlude(tiny_image, (3, 3, 3, 4), GRID)


def test_occlusion_test_and_baseline(captioner, tiny_image):
    decoding = DecodingConfig(beam_size=1)
    feats = captioner.encode([tiny_image])[0]
    hyp = captioner.decode(feats[None], decoding)[0][0]
    index = 1                                   # the colour word in "a <colour> <shape> ..."
    result = occlusion_test(captioner, tiny_image, hyp, index, decoding)
    assert result.word == captioner.words(hyp)[index]
    assert 0.0 <= result.prob_after <= 1.0 and 0.0 <= result.prob_before <= 1.0
    assert result.prob_before == pytest.approx(math.exp(hyp.token_logprobs[index]), abs=1e-4)
    assert result.drop == pytest.approx(result.prob_before - result.prob_after)
    r0, c0, r1, c1 = result.region
    assert (r1 - r0, c1 - c0) == (2, 2)
    assert r0 <= peak_region(hyp.attention[index], GRID)[0] < r1
    assert 0.0 < result.attention_mass <= 1.0
    assert result.caption_before == " ".join(captioner.words(hyp))
    assert isinstance(result.caption_after, str) and len(result.logprobs_after) == len(hyp.token_logprobs)
    before, after = np.asarray(tiny_image), np.asarray(result.image)
    x0, y0, x1, y1 = result.box
    outside = np.ones(before.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(before[outside], after[outside]) and not np.array_equal(before, after)
    # occluding the whole image must change the model's belief about the colour word
    everything = occlusion_test(captioner, tiny_image, hyp, index, decoding, region=(0, 0, GRID, GRID))
    assert everything.prob_after != pytest.approx(everything.prob_before, abs=1e-3)

    base = random_region_baseline(captioner, tiny_image, hyp, index, samples=3, exclude=result.region,
                                  batch_size=2)   # batches of 2, the shape already warmed up above
    assert len(base.drops) == len(base.regions) == 3 and result.region not in base.regions
    assert base.prob_before == pytest.approx(result.prob_before, abs=1e-6)
    assert all(-1.0 <= d <= 1.0 for d in base.drops)
    with pytest.raises(ConfigError, match="word_index"):
        occlusion_test(captioner, tiny_image, hyp, len(hyp.token_ids) + 1, decoding)


# -- bounded renderings of extreme shapes (a 1x50000 upload is a 1x1024 strip after load_image) ------------------

@pytest.mark.parametrize("size", [(4, 200), (1, 1024), (1024, 1)])
def test_grid_gif_and_overlay_stay_bounded_for_strips(size):
    from core.images import DISPLAY_LIMITS, display_box
    strip = Image.new("RGB", size, (90, 160, 40))
    words = ["a", "tall", "thin", "thing"]
    att = np.random.default_rng(2).dirichlet(np.ones(L), size=len(words) + 1).astype(np.float32)
    limit = DISPLAY_LIMITS.max_side
    # grid panels are letterboxed to at most max_aspect (224 x 896), not 224 x 229,000 px
    grid_img = attention_grid(strip, words, att, GRID, cols=5, panel_width=224)
    pw, ph = display_box(size, 224).canvas
    assert grid_img.size == (5 * pw + 4 * GAP, ph + TITLE_HEIGHT)
    assert ph <= 224 * DISPLAY_LIMITS.max_aspect and pw == 224
    gif = Image.open(io.BytesIO(attention_gif_bytes(strip, words, att, GRID, width=320)))
    assert max(gif.size) <= limit + 30 and len(list(ImageSequence.Iterator(gif))) == len(words) + 1
    shown = attention_overlay(strip, att[0], GRID)
    assert max(shown.size) <= limit and max(shown.size) / min(shown.size) <= DISPLAY_LIMITS.max_aspect


def test_attention_overlay_heats_the_image_not_the_padding():
    from core.images import DISPLAY_FILL, display_box
    strip = Image.new("RGB", (14, 1024), (255, 255, 255))
    x0, y0, x1, y1 = display_box(strip.size).content
    shown = np.asarray(attention_overlay(strip, one_hot(0, 0), GRID, opacity=1.0, cmap="gray", smooth=False))
    assert (shown[:, :x0] == DISPLAY_FILL).all() and (shown[:, x1:] == DISPLAY_FILL).all()   # padding: untouched
    image = shown[y0:y1, x0:x1]
    assert (image[0, :2] == 255).all() and (image[0, 2:] == 0).all()   # the hot cell: top-left 2 of 14 px
    assert (image[-1] == 0).all()


def test_attention_grid_total_pixels_are_capped_for_long_captions(tiny_image):
    from core.images import DISPLAY_LIMITS
    steps = 400
    att = np.full((steps, L), 1 / L, dtype=np.float32)
    grid_img = attention_grid(Image.new("RGB", (1, 1024)), ["w"] * steps, att, GRID, cols=5)
    title_and_gaps = steps / 5 * (TITLE_HEIGHT + GAP) * grid_img.width
    assert grid_img.width * grid_img.height - title_and_gaps <= DISPLAY_LIMITS.max_total_pixels * 1.05
