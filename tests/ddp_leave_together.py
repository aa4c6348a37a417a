"""Run under torchrun by tests/test_distributed.py: rank 0 keeps working after the ranks' last collective (as the
CLIs do when rank 0 writes the merged outputs); each rank records when it left `torchrun_group`."""
import json
import sys
import time
from pathlib import Path

import torch

from core.distributed import rank_world, torchrun_group

out = Path(sys.argv[1])
with torchrun_group("gloo") as (rank, world):
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, rank)
    if rank == 0:
        time.sleep(1.5)
        finished_writing = time.time()
        (out / "rank0.json").write_text(json.dumps({"finished_writing": finished_writing}))
left = {"left": time.time(), "group_after": torch.distributed.is_initialized(), "rank_world_after": rank_world(),
        "gathered": gathered}
(out / f"left{rank}.json").write_text(json.dumps(left))
