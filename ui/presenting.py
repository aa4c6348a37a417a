"""What the Presentation page draws: the projector style, one word's frame, the caption revealed so far."""
from __future__ import annotations

import hashlib
import html

import numpy as np
import streamlit as st
from PIL import Image

from core import analysis
from core.images import fit_for_display

SECONDS_PER_WORD = 1.2

# large type, no sidebar / header / toolbar: only the picture, the caption and the controls
PROJECTOR_CSS = """<style>
[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], header[data-testid="stHeader"],
[data-testid="stToolbar"] {display: none !important;}
[data-testid="stMain"] .block-container {padding-top: 1rem; max-width: 100%;}
.cs-caption {font-size: 2.6rem; line-height: 1.3; font-weight: 600; margin: .6rem 0 1rem; text-align: center;}
.cs-caption .cs-now {color: #dc2626; text-decoration: underline;}
.cs-caption .cs-later {visibility: hidden;}
</style>"""


def signature(tokens: list[str]) -> str:
    return hashlib.sha1(" ".join(tokens).encode()).hexdigest()[:10]


def caption_html(tokens: list[str], t: int) -> str:
    """Words 1..t+1 shown (the current one marked), the rest kept in place but hidden; all escaped."""
    parts = []
    for i, word in enumerate(tokens):
        cls = "cs-now" if i == t else "cs-later" if i > t else ""
        parts.append(f'<span class="{cls}">{html.escape(word)}</span>' if cls else html.escape(word))
    return f'<div class="cs-caption">{" ".join(parts)}</div>'


@st.cache_data(max_entries=256, show_spinner=False)
def word_frame(checkpoint_id: str, content_key: str, decoding: dict, t: int, _image: Image.Image,
               _attention: np.ndarray, _grid: int) -> Image.Image:
    """The image (core.images.fit_for_display) with word t's attention over it."""
    image = fit_for_display(_image.convert("RGB"))       # bounded: <= 1024 px a side, extreme shapes letterboxed
    heat = analysis.upsample_attention(_attention[t], _grid, image.size)
    return analysis.overlay_heatmap(image, heat, opacity=0.45)
