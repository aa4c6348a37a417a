"""CaptionScope core: the Show-Attend-and-Tell pipeline as stages you can read top to bottom.

data -> text (vocab) -> images -> encoders -> features -> model -> decoding -> metrics -> checkpoint,
with `captioner` tying them together for the CLIs (`python -m core.train|evaluate|caption|features`)
and the Streamlit dashboard.
"""

import os

# libgomp's worker threads spin ~300k rounds after every parallel region before they sleep. Between the
# compiled encoder's many short kernels that spin competed with the next kernel for a 2-core machine's
# cores: a short spin made feature extraction ~1.4x faster and changed nothing else measurably
# (`python -m bench`, side by side). It must be set before torch loads libgomp, hence here; an explicit
# GOMP_SPINCOUNT in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
