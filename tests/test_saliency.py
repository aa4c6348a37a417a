"""Per-word evidence maps and deletion curves on the tiny synthetic model, whose evidence is known: the
colour word of "a <colour> <shape> ..." can only come from the shape's cells (the background is white)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core import saliency
from core.decoding import DecodingConfig
from core.errors import ConfigError

GRID = 7
COLOUR = 1          # position of the colour word


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from core.captioner import Captioner
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def example(captioner, tiny_flickr):
    path = sorted((tiny_flickr / "images").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB")
    feats = captioner.encode([image])[0]
    hyp = captioner.decode(feats[None], DecodingConfig(beam_size=1))[0][0]
    return image, feats, hyp, saliency.caption_of(captioner, hyp)


def shape_cells() -> np.ndarray:
    """Cells wholly inside the shape (drawn over 1/5..4/5 of the image): rows and columns 2..4."""
    return np.array([r * GRID + c for r in range(2, 5) for c in range(2, 5)])


def background_cells() -> np.ndarray:
    """The outer ring of cells: only white wall."""
    return np.array([r * GRID + c for r in range(GRID) for c in range(GRID) if r in (0, 6) or c in (0, 6)])


def test_masked_scorer_equals_model_step_on_masked_features(captioner, example):
    _, feats, _, caption = example
    rng = np.random.default_rng(0)
    masks = rng.random((12, GRID * GRID)) < 0.4
    built = torch.where(torch.from_numpy(masks)[..., None], feats.mean(0), feats)
    with torch.inference_mode():
        expected = saliency.teacher_forced_logprobs(captioner.model, built, caption)
        scorer = saliency.MaskedScorer(captioner.model, feats, caption)
        every = scorer.logprobs(torch.from_numpy(masks), every_step=torch.ones(12, dtype=torch.bool))
        upto = torch.from_numpy(rng.integers(0, len(caption), 12))
        one = scorer.logprobs(torch.from_numpy(masks), upto)
    np.testing.assert_allclose(every.numpy(), expected.numpy(), atol=1e-5)
    for r in range(12):
        assert one[r, upto[r]] == pytest.approx(float(expected[r, upto[r]]), abs=1e-5)
        assert torch.isnan(one[r, upto[r] + 1:]).all()     # nothing scored past the asked position


def test_saliency_is_grad_times_input_summed_over_channels(captioner, example):
    _, feats, _, caption = example
    T = len(caption)
    fast = saliency.saliency_maps(captioner.model, feats, caption)
    with torch.enable_grad():
        rows = feats.unsqueeze(0).repeat(T, 1, 1).requires_grad_(True)
        logp = saliency.teacher_forced_logprobs(captioner.model, rows, caption)
        (grad,) = torch.autograd.grad(logp.diagonal().sum(), rows)
    expected = (grad * feats).sum(2).numpy()
    assert fast.shape == (T, GRID * GRID)
    np.testing.assert_allclose(fast, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    assert np.abs(fast).max() > 0


def test_occluding_the_shape_drops_the_colour_word_more_than_elsewhere(captioner, example):
    image, _, hyp, caption = example
    assert captioner.words(hyp)[COLOUR] in ("red", "green", "blue", "yellow")
    ring = background_cells()
    masks = np.stack([np.zeros(GRID * GRID, bool), saliency.cells_mask(shape_cells(), GRID),
                      saliency.cells_mask(ring[:9], GRID), saliency.cells_mask(ring[-9:], GRID)])
    feats = saliency.encode_masks(captioner, image, masks)
    with torch.inference_mode():
        p = saliency.teacher_forced_logprobs(captioner.model, feats, caption).exp()[:, COLOUR].numpy()
    shape_drop, elsewhere = p[0] - p[1], p[0] - p[2:]
    assert shape_drop > 0.05 and np.all(shape_drop > elsewhere + 0.05), p
    # the occlusion map: one re-encode per tile, every cell of a tile carries the tile's drop
    occ = saliency.occlusion_maps(captioner, image, caption, block=2, batch_size=25)
    assert occ.shape == (len(caption), GRID * GRID)
    tiles = occ[COLOUR].reshape(GRID, GRID)
    assert tiles[2, 2] == tiles[3, 3] and tiles[6, 6] != tiles[5, 5] or tiles[6, 6] == tiles[5, 5] == 0
    assert tiles[0, 0] == tiles[0, 1] == tiles[1, 0]


@pytest.mark.parametrize("space", ["feature", "pixel"])
def test_random_deletion_auc_lies_between_shape_first_and_shape_last(captioner, example, space):
    image, feats, _, caption = example
    shape, ring = shape_cells(), background_cells()
    rest = np.setdiff1d(np.arange(GRID * GRID), np.r_[shape, ring])
    orders = {"shape first": np.r_[shape, rest, ring], "shape last": np.r_[ring, rest, shape]}
    score = (saliency.feature_scorer(captioner.model, feats, caption) if space == "feature"
             else saliency.pixel_scorer(captioner, image, caption, batch_size=25))
    step = 1 if space == "feature" else 4
    named, random = saliency.deletion_scores(score, orders, saliency.random_orders(GRID * GRID, 5), COLOUR,
                                             step=step)
    fractions = saliency.deletion_points(GRID * GRID, step) / (GRID * GRID)
    auc = {k: saliency.area_under(v, fractions) for k, v in named.items()}
    auc_random = np.mean([saliency.area_under(r, fractions) for r in random])
    if space == "feature":
        assert auc["shape first"] < auc_random < auc["shape last"], (auc, auc_random)
    else:   # greying the white wall is itself a change the tiny model never saw: only the shape-first side
        assert auc["shape first"] < auc_random and auc["shape first"] < auc["shape last"], (auc, auc_random)
    # every curve starts at the word's probability on the untouched image and ends at the fully removed one
    assert named["shape first"][0] == pytest.approx(named["shape last"][0], abs=1e-5)
    assert named["shape first"][-1] == pytest.approx(random[0][-1], abs=1e-4)


def test_deletion_masks_points_and_area():
    order = np.array([3, 0, 2, 1])
    masks = saliency.deletion_masks(order)
    assert masks.shape == (5, 4) and not masks[0].any() and masks[-1].all()
    assert masks[1].tolist() == [False, False, False, True] and masks[2].tolist() == [True, False, False, True]
    assert saliency.deletion_points(49, 5).tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 49]
    assert saliency.area_under(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert saliency.area_under(np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert saliency.area_under(np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.9, 1.0])) == pytest.approx(0.45)
    assert saliency.ranking(np.array([0.1, 0.5, 0.5, 0.2])).tolist() == [1, 2, 3, 0]
    with pytest.raises(ConfigError, match="deletion step"):
        saliency.deletion_points(49, 0)


def test_spearman_and_correlations():
    a = np.arange(10.0)
    assert saliency.spearman(a, a ** 3) == pytest.approx(1.0)
    assert saliency.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(saliency.spearman(a, np.ones(10)))
    assert set(saliency.map_correlations({"x": a, "y": a, "z": -a})) == {"x vs y", "x vs z", "y vs z"}
    with pytest.raises(ConfigError, match="differ in size"):
        saliency.spearman(a, a[:5])


def test_verdict_line_reads_plainly():
    line = saliency.verdict_line({"attention": 0.3, "saliency": 0.2, "random": 0.5}, (0.45, 0.55), 0.9)
    assert line.startswith("Attention ranks the regions that matter better than chance, and worse than "
                           "gradient saliency")
    assert "no better than chance" in saliency.verdict_line({"attention": 0.5}, (0.45, 0.55), 0.9)
    assert "worse than chance" in saliency.verdict_line({"attention": 0.7, "occlusion": 0.7}, (0.45, 0.55), 0.9)
    assert "as well as occlusion" in saliency.verdict_line({"attention": 0.7, "occlusion": 0.7}, (0.45, 0.55), 0.9)


def test_out_of_range_word_and_region_are_refused_by_name(example):
    _, _, _, caption = example
    with pytest.raises(ConfigError, match=r"word_index 99 is outside the caption"):
        caption.check_position(99)
    with pytest.raises(ConfigError, match="word_index"):
        caption.check_position(-1)
    with pytest.raises(ConfigError, match=r"region index 49 is outside the grid \(0\.\.48\)"):
        saliency.check_grid_index(49, 49)
    assert saliency.check_grid_index(48, 49) == 48
