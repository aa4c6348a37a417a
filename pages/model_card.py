"""Model card: training curves, configuration, and metrics next to the paper's Flickr8K numbers."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.errors import CaptionScopeError
from core.model_card import PAPER_FLICKR8K, eval_path, find_training_log, metric_rows, read_eval_card, read_training_log
from ui import sidebar, state, widgets

sidebar.page_setup()
st.title("Model card")
path = state.selected_checkpoint_path()
if path is None:
    _, error = state.get_captioner()
    st.error(error or "No checkpoint selected.")
    st.stop()
try:
    meta = state.checkpoint_metadata(str(path), widgets.mtime_ns(path))
except CaptionScopeError as e:
    st.error(str(e).splitlines()[0])
    st.stop()

training, encoder, model_config = meta.training, meta.encoder, meta.model_config
train_config = meta.training_config
vocab_size = meta.vocab_size
st.caption(f"{path.name} · created {meta.created or '?'} · weights stored as {meta.dtype or '?'}")

widgets.facts_row({
    "Encoder": f"{encoder.get('name', '?')} ({'fine-tuned' if encoder.get('fine_tuned') else 'frozen'})",
    "Vocabulary": f"{vocab_size:,} words" if isinstance(vocab_size, int) else "?",
    "Decoder": f"LSTM {model_config.get('decoder_dim', '?')}, attention {model_config.get('attention_dim', '?')}",
    "Best epoch": str(training.get("best_epoch", training.get("epoch", "?")))})


# -- training curves -----------------------------------------------------------------------------------------------
st.subheader("Training")
log = find_training_log(path, training.get("log"))
if log is None:
    st.info(f"No training log found next to the checkpoint (looked for {path.stem}.log.jsonl"
            + (f" and {training['log']}" if training.get("log") else "") + ").")
else:
    records, bad = read_training_log(log)
    curves = pd.DataFrame(records)
    if curves.empty:
        st.info(f"{log.name} has no epoch records.")
    else:
        curves = curves.reset_index(drop=True).rename_axis("step")  # xe epochs, then scst evaluations
        c1, c2 = st.columns(2)
        with c1:
            loss = [k for k in ("train_loss", "train_ce") if k in curves]
            if loss:
                st.line_chart(curves[loss], x_label="epoch", y_label="loss")
                st.caption("Training loss per epoch (train_ce: cross-entropy only, without the attention term).")
        with c2:
            dev = {k: v for k, v in (("dev_bleu4", "dev BLEU-4"), ("dev_cider_d", "dev CIDEr-D")) if k in curves}
            if dev:
                st.line_chart((curves[list(dev)] * 100).rename(columns=dev), x_label="epoch", y_label="×100")
                st.caption("Dev-split scores after each epoch (decoded with the training run's eval beam).")
        st.caption(f"From {log.name}" + (f" ({bad} unreadable line(s) skipped)" if bad else ""))

# -- metrics -----------------------------------------------------------------------------------------------------
st.subheader("Metrics (×100)")


def scaled(metrics: dict) -> dict:
    """Metric values for display. Values from core.metrics are in [0, 1]; a file already in x100 is kept."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    already_x100 = any(numbers.get(m, 0) > 1.5 for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"))
    return widgets.metric_row(numbers, scale=1.0 if already_x100 else 100.0)


rows = []
dev = meta.dev_scores
if dev:
    beam = train_config.get("eval_beam")
    rows.append({"model": f"This checkpoint, dev{f', beam {beam}' if beam else ''} (training)", **scaled(dev)})
card = read_eval_card(path)
for row in metric_rows(card, include_paper=False):
    rows.append({"model": row.pop("model"), **widgets.metric_row(
        {k: v for k, v in row.items() if k not in ("mean_length", "vocabulary_used")}, scale=1.0)})
for name, values in PAPER_FLICKR8K.items():
    rows.append({"model": name, **widgets.metric_row(values, scale=1.0)})
st.table(widgets.metric_table(rows))
st.caption("Paper: Xu et al. 2015, *Show, Attend and Tell*, Table 1, Flickr8K test split (Oxford VGG encoder, "
           "METEOR by their own script); empty cells were not reported. "
           + ("" if card else f"Run `python -m core.evaluate --card` to add {eval_path(path).name}."))

# -- configuration -----------------------------------------------------------------------------------------------
st.subheader("Configuration")
c1, c2 = st.columns(2)
with c1:
    st.markdown("**Decoder (model_config)**")
    st.table(widgets.key_value_table(model_config))
with c2:
    st.markdown("**Encoder**")
    sha = encoder.get("weights_sha256")
    enc_rows = {"name": encoder.get("name"), "weights sha256": f"{sha[:16]}…" if sha else None,
                "weights source": encoder.get("weights_source"),
                "fine-tuned": "yes" if encoder.get("fine_tuned") else "no", "vocabulary size": vocab_size}
    st.table(widgets.key_value_table(enc_rows))
    if sha:
        st.code(sha, language=None, wrap_lines=True)
        st.caption("Encoder weights sha256 the decoder was trained with.")
    decoding_defaults = meta.decoding
    if decoding_defaults:
        st.markdown("**Default decoding**")
        st.table(widgets.key_value_table(decoding_defaults))
if train_config:
    with st.expander("Training configuration"):
        st.json({k: v for k, v in train_config.items() if k not in ("data", "features", "out")}
                | {k: Path(str(v)).name for k, v in train_config.items() if k in ("data", "features", "out") and v})
readme = path.parent / "README.md"
if readme.is_file():
    with st.expander(f"{path.parent.name}/README.md"):
        st.markdown(readme.read_text(encoding="utf-8", errors="replace"))
