"""SCST: the CIDEr-D reward is pycocoevalcap's, and the CLI trains, logs, checkpoints and resumes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from core.checkpoint import load_checkpoint
from core.metrics import simple_tokenize
from core.scst import CiderDReward, main, sample_captions

REFS = {
    "a.jpg": ["A dog runs on the grass.", "a brown dog running", "The dog is running through a field",
              "dog on grass", "A brown dog plays outside"],
    "b.jpg": ["Two children play in the water", "kids splash in a pool", "two kids are swimming",
              "Children in the pool.", "two young children playing in water"],
    "c.jpg": ["a man rides a bike down the street", "A cyclist on a road", "man riding a bicycle",
              "a man on a bike", "The man is riding his bike on the street"],
    "d.jpg": ["a dog jumps to catch a frisbee", "A dog catches a frisbee in the park",
              "the black dog jumps", "dog leaping for a frisbee", "a dog in the air"],
}
PREDS = {"a.jpg": "a brown dog is running on the grass", "b.jpg": "two children are playing in the water",
         "c.jpg": "a dog runs on the street", "d.jpg": "a man rides a bike"}


def test_reward_equals_pycocoevalcap_when_idf_comes_from_the_same_references():
    images = list(REFS)
    ours = CiderDReward(REFS)([PREDS[i] for i in images], images)
    gts = {i: [simple_tokenize(c) for c in REFS[i]] for i in images}
    res = {i: [simple_tokenize(PREDS[i])] for i in images}
    mean, per_image = Cider().compute_score(gts, res)
    np.testing.assert_allclose(ours, per_image, rtol=1e-12, atol=1e-12)
    assert ours.mean() == pytest.approx(mean)
    assert len(set(np.round(ours, 6))) == len(images)     # the scores really differ, not all 0


def test_reward_uses_the_fixed_idf_for_any_subset_and_does_not_grow_it():
    reward = CiderDReward(REFS)
    full = reward([PREDS[i] for i in REFS], list(REFS))
    df_size = len(reward.document_frequency)
    # one image scored alone: batch-level CIDEr-D would be 0, ours keeps the corpus idf and the same value
    alone = reward([PREDS["a.jpg"], "zebra giraffe elephant"], ["a.jpg", "a.jpg"])
    assert alone[0] == pytest.approx(full[0]) and alone[0] > 0
    assert alone[1] == 0.0
    assert len(reward.document_frequency) == df_size


def test_memorised_caption_earns_more_than_a_wrong_one(tiny_flickr):
    from core.data import load_dataset
    items = load_dataset(tiny_flickr).split("train")
    reward = CiderDReward({it.image: it.captions for it in items})
    image = items[0].image                       # "a red square on a white wall"
    scores = reward(["a red square on a white wall", "a red circle on a white wall",
                     "a blue circle on a white wall"], [image] * 3)
    # n-grams every image shares ("on a white wall") carry no idf: only colour and shape earn reward
    assert scores[0] > scores[1] > scores[2] == 0.0


def test_samples_stop_at_end_and_logprobs_carry_gradients(tiny_checkpoint, tiny_features):
    from core.features import open_features
    ckpt = load_checkpoint(tiny_checkpoint)
    feats = open_features(tiny_features, "efficientnet_lite2", "train").get(np.arange(4))
    gen = torch.Generator().manual_seed(0)
    tokens, logprob = sample_captions(ckpt.model, feats.repeat_interleave(3, 0), 12, generator=gen)
    assert logprob.requires_grad and logprob.shape == (12,) and bool((logprob <= 0).all())
    for row in tokens.tolist():
        if 2 in row:                                 # after <end>: only padding
            assert all(t == 0 for t in row[row.index(2) + 1:])
        assert 1 not in row and 3 not in row
    logprob.sum().backward()
    assert ckpt.model.classifier.weight.grad.abs().sum() > 0


def _run(args, tiny_checkpoint, tiny_flickr, tiny_features, out, **kw):
    base = ["--init", str(tiny_checkpoint), "--data", str(tiny_flickr), "--features", str(tiny_features),
            "--out", str(out), "--batch-size", "4", "--samples", "2", "--lr", "1e-3", "--eval-beam", "1",
            "--precision", "fp32", "--eval-every-steps", "2", "--threads", "1"]
    return main(base + args)


def test_cli_logs_checkpoints_and_resumes_exactly(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(["--max-steps", "4", "--keep-snapshots"], tiny_checkpoint, tiny_flickr, tiny_features, straight) == 0
    # "killed" after the first evaluation, then resumed
    assert _run(["--max-steps", "2"], tiny_checkpoint, tiny_flickr, tiny_features, killed) == 0
    assert _run(["--max-steps", "4", "--resume"], tiny_checkpoint, tiny_flickr, tiny_features, killed) == 0
    assert "resuming after step 2" in capsys.readouterr().out

    xe_lines = len((tiny_checkpoint.parent / "log.jsonl").read_text().splitlines())
    for out in (straight, killed):
        records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
        xe = [r for r in records if r["phase"] == "xe"]
        scst = [r for r in records if r["phase"] == "scst"]
        assert 1 <= len(xe) <= xe_lines and len(scst) == 2 and records[:len(xe)] == xe
        for r in scst:
            assert {"epoch", "train_loss", "dev_bleu4", "dev_cider_d", "lr", "epoch_time_s", "eval_time_s",
                    "samples_per_s", "time", "reward_sample", "reward_greedy"} <= set(r)
        epochs = [r["epoch"] for r in records]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)   # dashboard indexes by epoch
        assert [r["steps"] for r in scst] == [2, 4]

    last = load_checkpoint(straight / "last.safetensors")
    best = load_checkpoint(straight / "best.safetensors")
    assert last.metadata.dtype == "float32" and best.metadata.dtype == "float16"
    assert last.training["phase"] == "scst" and last.training["init"] == str(tiny_checkpoint)
    assert set(last.training["dev"]) == {"BLEU-4", "CIDEr-D"} and last.training["steps"] == 4
    assert last.encoder == load_checkpoint(tiny_checkpoint).encoder
    # best is never below the init model on dev
    assert best.training["dev"]["CIDEr-D"] >= last.training["init_dev"]["CIDEr-D"]
    # the update really changed the weights, and resuming gives the uninterrupted run's weights
    init_w = load_checkpoint(tiny_checkpoint).model.state_dict()
    resumed = load_checkpoint(killed / "last.safetensors").model.state_dict()
    changed = False
    for name, w in last.model.state_dict().items():
        torch.testing.assert_close(resumed[name], w, rtol=1e-5, atol=1e-6)
        changed |= not torch.allclose(w, init_w[name], atol=1e-4)
    assert changed
    # --keep-snapshots: one float32 copy per evaluation (for core.average); the last one is last.safetensors
    assert sorted(p.name for p in straight.glob("step-*.safetensors")) == ["step-00002.safetensors",
                                                                            "step-00004.safetensors"]
    assert not list(killed.glob("step-*.safetensors"))
    snapshot = load_checkpoint(straight / "step-00004.safetensors")
    assert snapshot.training["steps"] == 4 and snapshot.metadata.dtype == "float32"
    for name, w in snapshot.model.state_dict().items():
        assert torch.equal(w, last.model.state_dict()[name])


def test_bad_input_is_a_one_line_error(tiny_flickr, tiny_features, tmp_path, capsys):
    rc = main(["--init", str(tmp_path / "missing.safetensors"), "--data", str(tiny_flickr),
               "--features", str(tiny_features), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    bad = main(["--init", "x.safetensors", "--data", str(tiny_flickr), "--samples", "0"])
    assert bad == 2


def test_bleu_weight_adds_pycocoevalcaps_sentence_bleu4():
    from pycocoevalcap.bleu.bleu import Bleu
    images = list(REFS)
    cider_only = CiderDReward(REFS)(list(PREDS.values()), images)
    mixed = CiderDReward(REFS, bleu_weight=0.5)(list(PREDS.values()), images)
    tok = lambda s: " ".join(simple_tokenize(s))
    _, per_sentence = Bleu(4).compute_score({k: [tok(r) for r in v] for k, v in REFS.items()},
                                            {k: [tok(v)] for k, v in PREDS.items()}, verbose=0)
    assert np.allclose(mixed - cider_only, 0.5 * np.asarray(per_sentence[3]))
    assert (mixed > cider_only).any()
