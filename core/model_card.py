"""The files that travel with a checkpoint, and the model-card table built from them.

Next to `NAME.safetensors` may lie:
    NAME.log.jsonl    one JSON object per training epoch (written by core.train / core.scst)
    NAME.eval.json    dev-split scores at several beam widths (written by `python -m core.evaluate --card`)

    python -m core.model_card checkpoints/captionscope-lite2.safetensors     # prints the markdown table
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from core.io_utils import atomic_write_json
from core.metrics import METRIC_NAMES

# Xu et al. 2015, Table 1, Flickr8K (test split, VGG encoder); METEOR from their own script.
PAPER_FLICKR8K: dict[str, dict[str, float]] = {
    "Xu et al. 2015, soft attention": {"BLEU-1": 67.0, "BLEU-2": 44.8, "BLEU-3": 29.9, "BLEU-4": 19.5,
                                       "METEOR": 18.93},
    "Xu et al. 2015, hard attention": {"BLEU-1": 67.0, "BLEU-2": 45.7, "BLEU-3": 31.4, "BLEU-4": 21.3,
                                       "METEOR": 20.30},
}
EXTRA_COLUMNS = ("mean_length", "vocabulary_used")


def log_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.log.jsonl")


def eval_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.eval.json")


def find_training_log(checkpoint: str | Path, log_name: str | None = None) -> Path | None:
    """NAME.log.jsonl, else the bare file name the checkpoint's metadata gives (never a path elsewhere)."""
    candidates = [log_path(checkpoint)]
    if isinstance(log_name, str) and log_name and Path(log_name).name == log_name:
        candidates.append(Path(checkpoint).with_name(log_name))
    return next((p for p in candidates if p.is_file()), None)


def read_training_log(path: str | Path) -> tuple[list[dict], int]:
    """Epoch records (last one wins per epoch and phase) and the number of unreadable lines skipped."""
    records: dict[tuple, dict] = {}
    bad = 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), (int, float)):
            records[(record.get("phase", "xe"), record["epoch"])] = record
        else:
            bad += 1
    return list(records.values()), bad


def read_eval_card(checkpoint: str | Path) -> dict | None:
    path = eval_path(checkpoint)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and isinstance(card.get("beams"), dict) else None


def write_eval_card(checkpoint: str | Path, card: dict) -> Path:
    return atomic_write_json(eval_path(checkpoint), card)


def metric_rows(card: dict | None, *, include_paper: bool = True) -> list[dict]:
    """Rows {"model", metric x100 (CIDEr-D too) ..., mean_length, vocabulary_used}: this model's beams + the paper."""
    rows = []
    for beam, values in sorted((card or {}).get("beams", {}).items(), key=lambda kv: int(kv[0])):
        row = {"model": f"this model, {card.get('split', 'dev')}, beam {beam}"}
        row.update({m: 100 * values[m] for m in METRIC_NAMES if m in values})
        row.update({k: values[k] for k in EXTRA_COLUMNS if k in values})
        rows.append(row)
    if include_paper:
        rows += [{"model": name, **values} for name, values in PAPER_FLICKR8K.items()]
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = ["model", *METRIC_NAMES, *EXTRA_COLUMNS]

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.1f}" if column == "mean_length" else f"{value:.2f}"
        return str(value)

    header = ["model", *(f"{m} ×100" for m in METRIC_NAMES), "mean length", "vocabulary used"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.model_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    card = read_eval_card(args.checkpoint)
    if card is None:
        print(f"error: no readable {eval_path(args.checkpoint)}; run python -m core.evaluate --card", file=sys.stderr)
        return 2
    print(markdown_table(metric_rows(card)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
