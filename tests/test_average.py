"""core.average: the element-wise mean of one run's checkpoints, refused across runs."""
import pytest
import torch

from core.average import average_checkpoints, main
from core.checkpoint import load_checkpoint, save_checkpoint
from core.errors import CheckpointError


def test_the_average_is_the_mean_of_the_weights(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    shifted = {k: v + 0.5 if v.is_floating_point() else v for k, v in ckpt.model.state_dict().items()}
    ckpt.model.load_state_dict(shifted)
    other = save_checkpoint(tmp_path / "other.safetensors", ckpt.model, ckpt.vocab, encoder=ckpt.encoder,
                            training=ckpt.training, decoding=ckpt.decoding, dtype=torch.float32)
    out = average_checkpoints([tiny_checkpoint, other], tmp_path / "avg.safetensors", dtype=torch.float32)
    original, averaged = load_checkpoint(tiny_checkpoint).model.state_dict(), load_checkpoint(out).model.state_dict()
    assert all(torch.allclose(averaged[k], original[k] + 0.25, atol=1e-6) for k in original)
    same = average_checkpoints([tiny_checkpoint, tiny_checkpoint], tmp_path / "same.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(load_checkpoint(same).model.state_dict().values(), original.values()))
    assert load_checkpoint(out).training["averaged"] == [str(tiny_checkpoint), str(other)]


def test_checkpoints_of_different_runs_are_refused(tiny_checkpoint, tmp_path, capsys):
    ckpt = load_checkpoint(tiny_checkpoint)
    foreign = save_checkpoint(tmp_path / "foreign.safetensors", ckpt.model, ckpt.vocab,
                              encoder={**ckpt.encoder, "name": "densenet201"}, training=ckpt.training)
    with pytest.raises(CheckpointError, match="encoder differs"):
        average_checkpoints([tiny_checkpoint, foreign], tmp_path / "x.safetensors")
    assert main([str(tiny_checkpoint), "--out", str(tmp_path / "one.safetensors")]) == 2
    assert "at least two" in capsys.readouterr().err
