"""CaptionScope dashboard: `streamlit run dashboard.py` (from the repo root).

The entry point sets the page up and routes to the chosen page. Every page starts with
`ui.sidebar.page_setup()`, which draws the shared sidebar (checkpoint, decoding settings, Flickr8K folder;
see ui/sidebar.py). Pages are thin views over core/.
"""
from pathlib import Path

import streamlit as st

from ui.sidebar import PAGE_CONFIG

HERE = Path(__file__).resolve().parent

st.set_page_config(**PAGE_CONFIG)

PAGES = [
    st.Page(HERE / "pages" / "home.py", title="Home", icon=":material/home:", default=True),
    st.Page(HERE / "pages" / "caption.py", title="Caption", icon=":material/subtitles:"),
    st.Page(HERE / "pages" / "attention.py", title="Attention", icon=":material/visibility:"),
    st.Page(HERE / "pages" / "faithfulness.py", title="Faithfulness", icon=":material/fact_check:"),
    st.Page(HERE / "pages" / "presentation.py", title="Presentation", icon=":material/slideshow:"),
    st.Page(HERE / "pages" / "beams.py", title="Beam comparison", icon=":material/compare_arrows:"),
    st.Page(HERE / "pages" / "browser.py", title="Flickr8K browser", icon=":material/photo_library:"),
    st.Page(HERE / "pages" / "compare.py", title="Compare checkpoints", icon=":material/difference:"),
    st.Page(HERE / "pages" / "model_card.py", title="Model card", icon=":material/description:"),
]

st.navigation(PAGES).run()
