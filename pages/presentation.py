"""Presentation: one big image, the caption revealed word by word with each word's heatmap, large type."""
import streamlit as st

from ui import links, presenting, sidebar, state, widgets

sidebar.page_setup()
st.title("Presentation")
captioner = state.require_captioner()
decoding = state.decoding()

clean = st.toggle("Projector mode", value=True, key=f"{state.PERSIST}pres_clean",
                  help="Hides the sidebar and the page header; turn off to change settings or pages.")
if clean:
    st.html(presenting.PROJECTOR_CSS)
with st.expander("Image", expanded=False):
    item = widgets.single_image_picker("pres")
if item is None:
    st.info("Pick an image above (an example, an upload or a Flickr8K dev image).")
    st.stop()
decoded = widgets.caption_or_stop(captioner, item, decoding)
image = decoded.image

tokens = decoded.tokens(0)
steps = len(tokens)
word_key = f"pres_word_{item.key[:16]}_{presenting.signature(tokens)}"
widgets.init_state(word_key, 0, range(steps))
links.apply_index("word", word_key, steps)
playing_key = "pres_playing"
st.session_state.setdefault(playing_key, False)


def _step(delta: int) -> None:
    st.session_state[word_key] = min(max(int(st.session_state[word_key]) + delta, 0), steps - 1)


def _toggle_play() -> None:
    st.session_state[playing_key] = not st.session_state[playing_key]
    if st.session_state[playing_key] and st.session_state[word_key] >= steps - 1:
        st.session_state[word_key] = 0             # play again from the first word


c1, c2, c3, c4, _ = st.columns([1, 1, 1, 1, 4])
c1.button("Previous", icon=":material/skip_previous:", on_click=_step, args=(-1,), width="stretch")
c2.button("Pause" if st.session_state[playing_key] else "Play", on_click=_toggle_play, width="stretch",
          icon=":material/pause:" if st.session_state[playing_key] else ":material/play_arrow:")
c3.button("Next", icon=":material/skip_next:", on_click=_step, args=(1,), width="stretch")
with c4:
    link_slot = st.empty()


@st.fragment(run_every=presenting.SECONDS_PER_WORD if st.session_state[playing_key] else None)
def stage() -> None:
    """The image with the current word's heatmap and the caption so far; advances itself while playing."""
    if st.session_state[playing_key]:
        if st.session_state.get("pres_ticked"):
            _step(+1)
            if st.session_state[word_key] >= steps - 1:
                st.session_state[playing_key] = False
                st.session_state.pop("pres_ticked", None)
                st.rerun()             # redraw the Play button
        st.session_state["pres_ticked"] = True
    else:
        st.session_state.pop("pres_ticked", None)
    t = int(st.session_state[word_key])
    frame = presenting.word_frame(captioner.checkpoint_id, item.key, decoding.to_dict(), t, image,
                                  decoded.hypotheses[0].attention, captioner.grid)
    st.image(frame, width="stretch", output_format="JPEG")
    st.markdown(presenting.caption_html(tokens, t), unsafe_allow_html=True)


stage()
with link_slot:
    links.share({"word": int(st.session_state[word_key]) + 1})
