"""Home: what the loaded model is, how good it is on Flickr8K dev, and example photos to try."""
from pathlib import Path

import streamlit as st

from ui import settings, sidebar, state, widgets

sidebar.page_setup()
st.title("CaptionScope")
st.markdown("Inspect a **Show, Attend and Tell** image captioner: what it says, where it looks while saying "
            "each word, and how decoding settings change the result.")

captioner, error = state.get_captioner()
if captioner is None:
    st.error(error)
else:
    meta = captioner.metadata
    training = meta.training if meta is not None else {}
    config = meta.training_config if meta is not None else {}
    dataset = Path(str(config["data"])).name if config.get("data") else "unknown"
    dev = meta.dev_scores if meta is not None else {}

    facts = {"Encoder": captioner.encoder_name + (" (fine-tuned)" if captioner.fine_tuned else " (frozen)"),
             "Trained on": dataset, "Vocabulary": f"{len(captioner.vocab):,} words",
             "Attention grid": f"{captioner.grid}×{captioner.grid} regions",
             "Checkpoint": captioner.path.name if captioner.path else "?"}
    widgets.facts_row(facts)
    if dev:
        st.subheader("Dev-split scores (from the checkpoint)")
        mcols = st.columns(max(len(dev), 1))
        for col, (name, value) in zip(mcols, dev.items()):
            if isinstance(value, (int, float)):
                col.metric(f"{name} ×100", f"{value * 100:.1f}")
        epoch, beam = training.get("best_epoch", training.get("epoch")), config.get("eval_beam")
        st.caption(" · ".join(x for x in [f"best epoch {epoch}" if epoch is not None else "",
                                          f"beam {beam}" if beam else "",
                                          "details on the Model card page"] if x))

showcase = widgets.current_showcase()
dataset, _ = state.get_dataset() if showcase is not None else (None, None)
if showcase is not None and dataset is not None:
    st.subheader("Flickr8K dev: best captioned, and where it fails")
    st.caption("Photos from the model's own world (Flickr8K's dev split, never trained on), ranked by CIDEr-D "
               "of the bundled checkpoint's captions.")
    for title, names in (("Best captioned", showcase.best[:4]), ("Where it fails", showcase.fails[:4])):
        st.markdown(f"**{title}**")
        for col, name in zip(st.columns(4), names):
            with col:
                path = dataset.images_dir / name
                st.image(widgets.square_thumbnail(str(path), widgets.mtime_ns(path)), width="stretch")
                if st.button(f"CIDEr-D {showcase.scores[name] * 100:.0f} · open", key=f"home_show_{name}",
                             width="stretch", help=name):
                    widgets.request_flickr_image("att", name)
                    st.switch_page("pages/attention.py")

st.subheader("Try an example")
examples = settings.example_images()
if not examples:
    st.info("No example photos in assets/examples/.")
else:
    cols = st.columns(len(examples))
    for col, (name, path) in zip(cols, examples.items()):
        with col:
            st.image(widgets.square_thumbnail(str(path), widgets.mtime_ns(path)), width="stretch")
            if st.button(f"Caption “{name}”", key=f"home_example_{name}", width="stretch"):
                st.session_state["requested_example"] = name
                st.switch_page("pages/caption.py")
    st.caption("Public-domain / CC0 photos from scikit-image's sample data (assets/examples/README.md). They lie "
               "**outside the training domain** (Flickr8K: people, dogs, water, snow, bikes), so expect "
               "Flickr8K-style captions that miss: the attention maps are still the model's."
               + ("" if showcase is not None else " Set a Flickr8K folder in the sidebar for in-domain "
                                                   "showcase images."))

st.subheader("Pages")
st.markdown(
    "- **Caption**: upload photos (or pick examples) and get the n-best captions with scores and timings.\n"
    "- **Attention**: the attention map behind every word, its entropy and the β gate, and an occlusion check "
    "of whether the word really depends on the region it looked at.\n"
    "- **Beam comparison**: one image at beam widths 1–10, and a BLEU-4 / CIDEr-D sweep over Flickr8K dev.\n"
    "- **Flickr8K browser**: every dev image with its references, caption and scores; sort by the worst.\n"
    "- **Model card**: training curves, configuration and metrics next to the paper's Flickr8K numbers.")
