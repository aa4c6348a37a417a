import json
import shutil

from core.evaluate import main as evaluate_main
from core.model_card import (PAPER_FLICKR8K, find_training_log, main, markdown_table, metric_rows,
                             read_eval_card, read_training_log)


def test_training_log_keeps_the_last_record_per_epoch_and_counts_bad_lines(tmp_path):
    log = tmp_path / "m.log.jsonl"
    log.write_text("\n".join([json.dumps({"epoch": 0, "train_loss": 3.0}), "{broken",
                              json.dumps({"epoch": 0, "train_loss": 2.5}), json.dumps({"no": "epoch"}),
                              json.dumps({"epoch": 0, "phase": "scst", "train_loss": -0.1})]))
    records, bad = read_training_log(log)
    assert bad == 2 and [r["train_loss"] for r in records] == [2.5, -0.1]
    assert find_training_log(tmp_path / "m.safetensors") == log
    assert find_training_log(tmp_path / "other.safetensors", "../../etc/passwd") is None
    assert find_training_log(tmp_path / "other.safetensors", "m.log.jsonl") == log


def test_evaluate_card_round_trip(tiny_checkpoint, tiny_flickr, tiny_features, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    rc = evaluate_main(["--checkpoint", str(checkpoint), "--data", str(tiny_flickr), "--features",
                        str(tiny_features), "--beam", "1", "3", "--out", str(tmp_path / "eval"), "--card"])
    assert rc == 0
    card = read_eval_card(checkpoint)
    assert set(card["beams"]) == {"1", "3"} and card["dev_subset"]["images"] == 8
    assert card["beams"]["3"]["BLEU-4"] > 0.9          # the tiny model reproduces its captions
    for beam in ("1", "3"):
        metrics = json.loads((tmp_path / "eval" / f"beam{beam}" / "metrics.json").read_text())
        assert metrics["metrics"]["BLEU-4"] == card["beams"][beam]["BLEU-4"]
    rows = metric_rows(card)
    assert [r["model"] for r in rows][-2:] == list(PAPER_FLICKR8K)
    table = markdown_table(rows)
    assert "beam 3" in table and "19.50" in table
    assert main([str(checkpoint)]) == 0 and "BLEU-4 ×100" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.safetensors")]) == 2
