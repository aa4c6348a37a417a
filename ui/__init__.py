"""Streamlit-side helpers of the dashboard: the shared sidebar/session state, cached calls and widgets.

Everything a CLI could also need lives in `core/`; this package only adapts it to Streamlit (caching,
session state, rendering).
"""
