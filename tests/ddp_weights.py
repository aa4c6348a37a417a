"""`torchrun ... tests/ddp_weights.py OUT-ARGS...`: run `core.train`'s CLI, then let every rank write
OUT/rank{r}.sha, the sha256 of its final decoder weights, so test_distributed can check that the replicas
agree (rank 0 alone writes checkpoints). The hook lives here, not in core.train."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import core.train as train

created = []


class RecordedModel(train.ShowAttendTell):
    """The model train() builds, remembered so its weights can be hashed after training."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        created.append(self)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    train.ShowAttendTell = RecordedModel
    argv = sys.argv[1:]
    status = train.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    (out / f"rank{os.environ.get('RANK', '0')}.sha").write_text(weights_sha256(created[0]) + "\n")
    sys.exit(status)
