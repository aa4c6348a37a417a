"""Resumable training state (optimizer, scheduler, RNG, counters) without pickle.

Tensors go into a safetensors file, everything else into its JSON header, so a resumed run restores the
exact optimizer moments and random streams, and a stranger's state file still cannot run code.

The model's weights are stored here too (prefix "model."): this one file is the commit point of an epoch.
Taking the weights from `last.safetensors` instead would pair them with the wrong optimizer state whenever
a kill lands between the two writes (last already at epoch k+1, the state still at epoch k).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save

from core.errors import CheckpointError
from core.io_utils import atomic_write_bytes


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a {"__tensor__": key} marker."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _int_keys(state: dict) -> dict:
    # optimizer.state is keyed by parameter index; JSON made those keys strings
    return {**state, "state": {int(k): v for k, v in state.get("state", {}).items()}}


MODEL_PREFIX = "model."


def save_train_state(path: str | Path, *, optimizer: torch.optim.Optimizer, scheduler: Any, counters: dict,
                     model: torch.nn.Module | None = None) -> Path:
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for name, t in (model.state_dict() if model is not None else {}).items():
        tensors[MODEL_PREFIX + name] = t.detach().to("cpu", copy=True).contiguous()
    meta = {
        "optimizer": _split_tensors(optimizer.state_dict(), "opt", tensors),
        "scheduler": _split_tensors(scheduler.state_dict(), "sched", tensors) if scheduler is not None else None,
        "counters": counters,
        "rng_python": _tuples_to_lists(random.getstate()),
        "rng_numpy": _split_tensors(_numpy_state(), "np", tensors),
        "has_model": model is not None,
    }
    blob = save(tensors, metadata={"format": "captionscope-train-state", "state": json.dumps(meta)})
    return atomic_write_bytes(path, blob)


def load_train_state(path: str | Path, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                     model: torch.nn.Module | None = None) -> dict:
    """Restore optimizer/scheduler/RNG (and the model's weights, when the file has them) in place.

    Returns the counters dict, with "model_restored": whether `model` was loaded from this file (states
    written before weights were stored here have none; the caller then falls back to last.safetensors).
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header["state"])
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    model_restored = False
    if model is not None and meta.get("has_model"):
        weights = {k[len(MODEL_PREFIX):]: t for k, t in tensors.items() if k.startswith(MODEL_PREFIX)}
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
        model_restored = True
    optimizer.load_state_dict(_int_keys(_join_tensors(meta["optimizer"], tensors)))
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(_join_tensors(meta["scheduler"], tensors))
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_lists_to_tuples(meta["rng_python"]))
    np_state = _join_tensors(meta["rng_numpy"], tensors)
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    return {**meta["counters"], "model_restored": model_restored}


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _tuples_to_lists(x: Any) -> Any:
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x
