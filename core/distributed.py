"""torchrun support shared by the CLIs that shard work across ranks (features, evaluate, faithfulness, train).

Under `torchrun` (LOCAL_RANK set) a CLI joins a process group for its run and leaves it with every other rank:
a rank that tore gloo down while rank 0 was still writing its output files aborted at exit with
"terminate called without an active exception" (seen in CI on `core.faithfulness`), so `torchrun_group`
waits at a barrier and then destroys the group, on success and on error alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextmanager
def torchrun_group(backend: str | None = None, timeout: timedelta | None = None) -> Iterator[tuple[int, int]]:
    """Join the process group when launched by torchrun and leave it together with the other ranks.
    Yields (rank, world). Outside torchrun, or when a group already exists (a caller owns it), does nothing.
    `backend` defaults to nccl on CUDA, gloo otherwise. `timeout` is how long a collective (the closing
    barrier included) may wait: torch's default (30 min for gloo) when None. A CLI where rank 0 works on
    alone for long passes more; a rank that dies still ends the run at once, since torchrun stops the others."""
    owned = "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized()
    if owned:
        options = {"timeout": timeout} if timeout is not None else {}
        torch.distributed.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), **options)
    try:
        rank, world = rank_world()
        yield rank, world
        # reached only when the run succeeded: a failed rank meeting here would leave the others waiting
        if owned and world > 1:
            torch.distributed.barrier()
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
