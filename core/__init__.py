"""CaptionScope core: the Show-Attend-and-Tell pipeline as stages you can read top to bottom.

data -> text (vocab) -> images -> encoders -> features -> model -> decoding -> metrics -> checkpoint,
with `captioner` tying them together for the CLIs (`python -m core.train|evaluate|caption|features`)
and the Streamlit dashboard.
"""
