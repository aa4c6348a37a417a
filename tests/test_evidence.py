"""Per-caption faithfulness: the fast feature-space path (core.masked_scorer, one request per caption with
distinct masks run once) against the plain loop (one masked map and one model.step pass per curve point,
one backward per word), on the tiny trained model."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core import evidence
from core.decoding import DecodingConfig


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from core.captioner import Captioner
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.mark.parametrize("beam", [1, 3])
def test_fast_feature_space_equals_the_plain_loop(captioner, tiny_flickr, beam):
    for path in sorted((tiny_flickr / "images").glob("*.jpg"))[:2]:
        feats = captioner.encode([Image.open(path).convert("RGB")])[0]
        hyp = captioner.decode(feats[None], DecodingConfig(beam_size=beam))[0][0]
        fast = evidence.caption_faithfulness(captioner, feats, hyp, seeds=3, seed=4)
        plain = evidence.reference_caption_faithfulness(captioner, feats, hyp, seeds=3, seed=4)
        assert [r["word"] for r in fast] == [r["word"] for r in plain] and len(fast) == len(hyp.token_ids) + 1
        for f, p in zip(fast, plain):
            for key in ("p_word", "auc_attention", "auc_saliency", "auc_random", "auc_random_low", "auc_random_high"):
                assert f[key] == pytest.approx(p[key], abs=2e-5), (f["word"], key)
        # the curves are not flat: the comparison has something to catch
        assert np.ptp([r["auc_attention"] for r in fast]) > 1e-3
