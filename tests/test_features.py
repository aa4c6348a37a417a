import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from core.data import load_dataset
from core.encoders import build_encoder
from core.errors import DataError
from core.features import cache_paths, extract_features, open_features

from conftest import REPO


def test_cache_matches_direct_encoding(tiny_flickr, tiny_features):
    encoder = build_encoder("efficientnet_lite2")   # as the fixture made them
    store = open_features(tiny_features, "efficientnet_lite2", "dev")
    items = load_dataset(tiny_flickr).split("dev")
    assert store.images == [it.image for it in items] and store.array.dtype == np.float16
    from core.images import load_image
    with torch.inference_mode():
        direct = encoder(torch.stack([encoder.preprocess(load_image(it.path)) for it in items[:3]]))
    assert torch.allclose(store.get([0, 1, 2]), direct, atol=2e-2, rtol=1e-2)


def test_foreign_or_truncated_cache_is_refused(tiny_features, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_features, copy)
    data, index = cache_paths(copy, "efficientnet_lite2", "dev")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 2)
    with pytest.raises(DataError, match="size does not match"):
        open_features(copy, "efficientnet_lite2", "dev")
    index.unlink()
    with pytest.raises(DataError, match="no finished feature cache"):
        open_features(copy, "efficientnet_lite2", "dev")


def test_killed_extraction_resumes_where_it_stopped(tiny_flickr, tmp_path):
    """SIGKILL a real run mid-way; the rerun continues (fewer images done) and equals a clean run."""
    out = tmp_path / "feats"
    code = (f"import sys, time, torch; sys.path.insert(0, {str(REPO)!r});"
            "import core.features as F;"
            "orig = F._ImageFiles.__getitem__\n"
            "def slow(self, i):\n    time.sleep(0.15); return orig(self, i)\n"
            "F._ImageFiles.__getitem__ = slow;"
            "torch.manual_seed(0);"
            f"F.main(['--data', {str(tiny_flickr)!r}, '--split', 'dev', '--encoder-weights', 'none',"
            f" '--out', {str(out)!r}, '--batch-size', '1', '--workers', '0'])")
    # chunk defaults to 256, so force frequent flushes through a tiny chunk via monkeypatching extract
    code = code.replace("torch.manual_seed(0);", "torch.manual_seed(0); _e = F.extract_features;"
                        "F.extract_features = lambda *a, **k: _e(*a, **{**k, 'chunk': 1});")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data, index = cache_paths(out, "efficientnet_lite2", "dev")
    progress = data.with_name(data.name + ".partial.progress.json")
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.is_file() and json.loads(progress.read_text())["done"] >= 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = json.loads(progress.read_text())["done"]
    assert 3 <= done_before < 8 and not index.exists()      # killed mid-way, nothing committed
    with pytest.raises(DataError):
        open_features(out, "efficientnet_lite2", "dev")

    torch.manual_seed(0)
    encoder = build_encoder("efficientnet_lite2", "none")
    items = load_dataset(tiny_flickr).split("dev")
    # batch size 1 as in the killed run: conv kernels may round differently for other batch sizes
    resumed = extract_features(encoder, [it.path for it in items], out, "dev", num_workers=0, progress=False,
                               batch_size=1)
    clean = extract_features(encoder, [it.path for it in items], tmp_path / "clean", "dev", num_workers=0,
                             progress=False, batch_size=1)
    assert np.array_equal(np.asarray(resumed.array), np.asarray(clean.array))
    assert not progress.exists()


def test_cli_reports_bad_data_dir(tmp_path, capsys):
    from core.features import main
    assert main(["--data", str(tmp_path / "nothing"), "--encoder-weights", "none"]) == 2
    assert "error:" in capsys.readouterr().err


def test_activation_cache_derives_the_feature_cache_and_stale_keys_are_refused(tiny_flickr, tmp_path):
    """--tail-stages 2 caches what enters the last two stages; --from-tail 2 runs only those stages and gives
    the features a direct extraction gives (up to float16 storage); a cache under another key is refused."""
    import shutil
    from core.features import derive_features, main
    torch.manual_seed(0)
    encoder = build_encoder("efficientnet_lite2", "none", 128)
    items = load_dataset(tiny_flickr).split("dev")
    paths = [it.path for it in items]
    acts = extract_features(encoder, paths, tmp_path, "dev", num_workers=0, progress=False, tail_stages=2)
    assert acts.key == "efficientnet_lite2@128-tail2" and acts.array.shape == (8, 16, 208)
    derived = derive_features(encoder, acts, 2, tmp_path, "dev")
    direct = extract_features(encoder, paths, tmp_path / "direct", "dev", num_workers=0, progress=False)
    assert derived.key == direct.key == "efficientnet_lite2@128" and derived.images == direct.images
    assert torch.allclose(derived.get(np.arange(8)), direct.get(np.arange(8)), atol=5e-2, rtol=2e-2)
    # a 128 px cache copied where 224 px features belong is not reused
    shutil.copytree(tmp_path / "efficientnet_lite2@128", tmp_path / "efficientnet_lite2")
    with pytest.raises(DataError, match="made as 'efficientnet_lite2@128'"):
        open_features(tmp_path, "efficientnet_lite2", "dev")
    with pytest.raises(DataError, match="--image-size 320 --tail-stages 2"):   # the message says what to run
        open_features(tmp_path, "efficientnet_lite2@320-tail2", "dev")
    assert main(["--data", str(tiny_flickr), "--split", "dev", "--encoder-weights", "none", "--image-size", "128",
                 "--tail-stages", "2", "--from-tail", "1", "--out", str(tmp_path)]) == 2   # only towards the output
