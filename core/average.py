"""Average the weights of several checkpoints of one run (Polyak-style averaging; still one model).

    python -m core.average runs/x/commit-12.safetensors runs/x/commit-13.safetensors ... --out avg.safetensors

Every input must share the model config, vocabulary and encoder (the metadata of the last one is kept).
Averaging the last few self-critical checkpoints smooths the noise of the policy-gradient steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import load_checkpoint, save_checkpoint
from core.errors import CheckpointError, cli_main


def average_checkpoints(paths: Sequence[str | Path], out: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write the element-wise mean of the checkpoints' weights (decoder and any fine-tuned encoder tail)."""
    if len(paths) < 2:
        raise CheckpointError("give at least two checkpoints to average")
    ckpts = [load_checkpoint(p) for p in paths]
    last = ckpts[-1]
    for path, c in zip(paths, ckpts):
        for what, mine, theirs in (("model config", c.config.to_dict(), last.config.to_dict()),
                                   ("vocabulary", c.vocab.to_dict(), last.vocab.to_dict()),
                                   ("encoder", c.encoder, last.encoder)):
            if mine != theirs:
                raise CheckpointError(f"{path}: its {what} differs from {paths[-1]}'s; only checkpoints of "
                                      f"one run can be averaged")

    def mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([s[k].float() for s in states]).mean(0) if states[0][k].is_floating_point()
                else states[-1][k] for k in states[0]}

    model = last.model
    model.load_state_dict(mean([c.model.state_dict() for c in ckpts]))
    encoder_state = mean([c.encoder_state for c in ckpts]) if last.encoder_state else None
    training = {**last.training, "averaged": [str(p) for p in paths]}
    return save_checkpoint(out, model, last.vocab, encoder=last.encoder, training=training,
                           decoding=last.decoding, encoder_state=encoder_state, dtype=dtype)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.average", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(f"wrote {average_checkpoints(args.checkpoints, args.out)} (mean of {len(args.checkpoints)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
