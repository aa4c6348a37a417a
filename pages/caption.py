"""Caption: upload photos or pick examples; n-best captions, scores and timings; CSV / JSON download."""
import json

import pandas as pd
import streamlit as st

from core.errors import CaptionScopeError
from core.images import SUPPORTED_EXTENSIONS, fit_for_display
from ui import cache, links, settings, sidebar, state, widgets
from ui.cache import ImageInput

sidebar.page_setup()
st.title("Caption")
captioner = state.require_captioner()
decoding = state.decoding()
st.caption(f"Decoding: {decoding.describe()} · length penalty {decoding.length_penalty:g} · max length {decoding.max_length}"
           f"{f' · no-repeat {decoding.no_repeat_ngram_size}-grams' if decoding.no_repeat_ngram_size else ''}"
           f"{''.join(f' · {knob}' for knob in decoding.describe_knobs())} (change in the sidebar)")

left, right = st.columns([3, 2])
with left:
    uploads = st.file_uploader("Upload photos", type=list(SUPPORTED_EXTENSIONS), accept_multiple_files=True,
                               key="caption_uploads", help=widgets.upload_help(),
                               max_upload_size=widgets.MAX_UPLOAD_MB)
linked = widgets.linked_image()               # ?image=NAME: an example, or a Flickr8K image captioned below
if linked and linked[0] == "example":
    st.session_state["requested_example"] = linked[1]
elif linked:
    st.session_state["caption_flickr"] = linked[1]
with right:
    examples = settings.example_images()
    key = f"{state.PERSIST}caption_examples"
    requested = st.session_state.pop("requested_example", None)
    if requested in examples:
        st.session_state[key] = [requested]
    widgets.init_state(key, [] if uploads else list(examples)[:1])
    st.session_state[key] = [n for n in st.session_state[key] if n in examples]
    picked = st.pills("Or pick examples", list(examples), selection_mode="multi", key=key, wrap=True)
st.caption(f"Images over {widgets.MAX_UPLOAD_MB} MB are refused; large photos are downscaled before encoding.")

# (name, ImageInput or error message), in the order shown
inputs: list[tuple[str, ImageInput | str]] = []
for upload in uploads or []:
    try:
        inputs.append((upload.name, ImageInput.from_upload(upload)))
    except CaptionScopeError as e:
        inputs.append((upload.name, str(e)))
for name in picked or []:
    try:
        inputs.append((name, widgets.example_input(name)))
    except CaptionScopeError as e:
        inputs.append((name, str(e)))
flickr_name = st.session_state.get("caption_flickr")
dataset, _ = state.get_dataset() if flickr_name else (None, None)
if flickr_name and dataset is not None:
    try:
        inputs.append((flickr_name, widgets.flickr_input(dataset, flickr_name)))
    except CaptionScopeError as e:
        inputs.append((flickr_name, str(e)))
if picked:
    links.set_image("example", widgets.example_link_name(picked[0]))
elif flickr_name and dataset is not None:
    links.set_image("flickr8k", flickr_name)
st.session_state["links_upload"] = bool(uploads)
links.share()

if not inputs:
    st.info("Upload a photo or pick an example to caption it.")
    st.stop()

records, report_entries = [], []
for label, item in inputs:
    st.divider()
    if isinstance(item, str):
        st.error(item)
        continue
    try:
        decoded = cache.caption(captioner, item, decoding)
        image = decoded.image
    except CaptionScopeError as e:
        st.error(str(e))
        continue
    pic, text = st.columns([2, 3])
    pic.image(fit_for_display(image), caption=item.name, width="stretch")
    with text:
        st.subheader(decoded.caption or "(empty caption)")
        st.caption(f"encode {decoded.encode_ms:.0f} ms · decode {decoded.decode_ms:.0f} ms · "
                   f"{len(decoded.hypotheses)} hypothes{'is' if len(decoded.hypotheses) == 1 else 'es'}")
        frame = widgets.nbest_frame(decoded)
        columns = {k: v for k, v in widgets.NBEST_COLUMNS.items()
                   if k != "score" or decoding.length_penalty}          # with α = 0 the score is the log-prob
        st.table(widgets.text_table(frame, columns), hide_index=True)
        st.caption("Log-prob: sum over the caption's tokens · per token: divided by the emitted tokens "
                   "(incl. <end>)" + (" · score: the length-penalised log-prob the list is ranked by"
                                      if decoding.length_penalty else ""))
    report_entries.append(widgets.report_entry(item, decoded))
    for row in frame.to_dict("records"):
        records.append({"image": item.name, "sha256": item.key, **row,
                        "encode_ms": round(decoded.encode_ms, 1), "decode_ms": round(decoded.decode_ms, 1)})

if records:
    st.divider()
    table = pd.DataFrame(records)
    payload = {"checkpoint": captioner.path.name if captioner.path else None,
               "checkpoint_sha256": captioner.checkpoint_id, "decoding": decoding.to_dict(), "results": records}
    c1, c2, c3, _ = st.columns([1, 1, 1, 2])
    widgets.report_button(captioner, decoding, report_entries, where=c3)
    c1.download_button("Download CSV", table.to_csv(index=False), file_name="captions.csv", mime="text/csv",
                       icon=":material/download:", on_click="ignore", width="stretch")
    c2.download_button("Download JSON", json.dumps(payload, indent=2), file_name="captions.json",
                       mime="application/json", icon=":material/download:", on_click="ignore", width="stretch")
