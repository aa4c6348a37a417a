"""The feature-space deletion engine: looked-up keys of the kept regions (deletion) give the numbers of the
mixed path (saliency's) and of model.step on the built maps; `wanted` scores exactly the asked positions;
distinct masks are merged with the positions any copy wants."""
from __future__ import annotations

import numpy as np
import torch

from core import saliency
from core.masked_scorer import MaskedScorer
from test_decoding import make_model


def test_kept_region_lookup_equals_the_mixed_path_and_model_step():
    model = make_model(seed=2).eval()
    feats = torch.randn(49, 8, generator=torch.Generator().manual_seed(0))
    caption = saliency.Caption([5, 7, 9, 11, 2], 1, (0, 1, 3))
    rng = np.random.default_rng(1)
    masks = rng.random((40, 49)) < rng.random((40, 1))          # from nearly none to nearly all removed
    masks[0], masks[1] = False, True
    wanted = rng.random((40, 5)) < 0.4
    wanted[2] = False                                             # a row nothing is asked of
    built = torch.where(torch.from_numpy(masks)[..., None], feats.mean(0), feats)
    with torch.inference_mode():
        scorer = MaskedScorer(model, feats, caption)
        looked_up = scorer.logprobs(torch.from_numpy(masks), wanted=torch.from_numpy(wanted))
        keep = torch.from_numpy(~masks).float()
        mixed = scorer.logprobs_mixed(keep, 1 - keep, every_step=torch.ones(40, dtype=torch.bool))
        stepped = saliency.teacher_forced_logprobs(model, built, caption)
    assert torch.isnan(looked_up[torch.from_numpy(~wanted)]).all()
    np.testing.assert_allclose(looked_up[torch.from_numpy(wanted)], stepped[torch.from_numpy(wanted)], atol=1e-5)
    np.testing.assert_allclose(mixed, stepped, atol=1e-5)


def test_distinct_masks_merge_the_wanted_positions():
    masks = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
    wanted = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=bool)
    unique, merged, inverse = saliency.distinct_masks(masks, wanted)
    assert len(unique) == 3 and (unique[inverse] == masks).all()
    assert merged[inverse[0]].tolist() == [True, True] and merged[inverse[1]].tolist() == [False, True]


def test_feature_scorer_answers_every_row_like_its_own_pass():
    model = make_model(seed=4).eval()
    feats = torch.randn(49, 8, generator=torch.Generator().manual_seed(3))
    caption = saliency.Caption([6, 8, 2], 1, (0, 1, 3))
    orders = [saliency.random_orders(49, 1, s)[0] for s in range(3)]
    masks = np.concatenate([saliency.deletion_masks(o) for o in orders])     # shared first and last points
    wanted = np.zeros((len(masks), 3), dtype=bool)
    wanted[np.arange(len(masks)), np.arange(len(masks)) % 3] = True
    lp = saliency.feature_scorer(model, feats, caption)(masks, wanted)
    built = torch.where(torch.from_numpy(masks)[..., None], feats.mean(0), feats)
    with torch.inference_mode():
        expected = saliency.teacher_forced_logprobs(model, built, caption).numpy()
    np.testing.assert_allclose(lp[wanted], expected[wanted], atol=1e-5)


def test_overlapping_single_threaded_sections_give_each_thread_its_count_back():
    """Two sessions' runs overlap (A enters, B enters, A leaves, B leaves): each thread, the main one
    included, ends at the count it had; inside, both run single-threaded."""
    import threading
    from core.masked_scorer import single_threaded
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def session_b():
            a_in.wait()
            start = torch.get_num_threads()
            with single_threaded():
                seen["inside"] = torch.get_num_threads()
                b_in.set()
                a_out.wait()
            seen["after"] = (start, torch.get_num_threads())
        thread = threading.Thread(target=session_b)
        thread.start()
        with single_threaded():
            assert torch.get_num_threads() == 1
            a_in.set()
            b_in.wait()
        assert torch.get_num_threads() == 2
        a_out.set()
        thread.join()
        assert torch.get_num_threads() == 2 and seen["inside"] == 1 and seen["after"][0] == seen["after"][1]
    finally:
        torch.set_num_threads(before)
