"""Checkpoints: round trip, metadata, hostile / corrupt files, metadata-vs-weights checks, safe path picking."""
import json
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import core.checkpoint as ckpt
from core.checkpoint import (Checkpoint, default_checkpoint_path, list_checkpoints, load_checkpoint,
                             read_metadata, resolve_checkpoint, save_checkpoint, save_uploaded_checkpoint)
from core.errors import CheckpointError
from core.model import ModelConfig, ShowAttendTell
from core.text import SPECIALS, Vocabulary

WORDS = ["a", "dog", "runs", "on", "the", "grass", "black", "cat"]
ENCODER = {"name": "efficientnet_lite2", "weights_sha256": "ab" * 32, "weights_source": "imagenet"}
TRAINING = {"epochs": 3, "best_cider": 0.512, "dataset": "flickr8k", "history": [1.5, 1.2, 1.1]}
DECODING = {"beam_size": 3, "max_length": 20}


def make_model(vocab_size: int = len(SPECIALS) + len(WORDS), seed: int = 0, **overrides) -> ShowAttendTell:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, encoder_dim=16, num_regions=4, embed_dim=8,
                         attention_dim=8, decoder_dim=8, dropout=0.0, **overrides)
    model = ShowAttendTell(config)
    with torch.no_grad():   # make every weight non-trivial so float16 rounding really changes values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(itos=list(SPECIALS) + WORDS)


@pytest.fixture
def saved(tmp_path, vocab) -> tuple[Path, ShowAttendTell]:
    model = make_model()
    path = save_checkpoint(tmp_path / "model.safetensors", model, vocab, encoder=ENCODER,
                           training=TRAINING, decoding=DECODING)
    return path, model


def rounded(model: ShowAttendTell, dtype=torch.float16) -> ShowAttendTell:
    copy = ShowAttendTell(model.config)
    copy.load_state_dict({k: v.to(dtype).to(torch.float32) for k, v in model.state_dict().items()})
    return copy.eval()


def step_logits(model: ShowAttendTell, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(3, model.config.num_regions, model.config.encoder_dim, generator=gen)
    with torch.inference_mode():
        state = model.init_state(features)
        logits, _, _, state = model.step(torch.full((3,), 1), state)
        logits2, _, _, _ = model.step(logits.argmax(1), state)
    return torch.cat([logits, logits2])


def rewrite(src: Path, dst: Path, *, meta: dict | None = None, drop_meta=(), tensors=None) -> Path:
    """Copy a checkpoint with edited metadata (dict values are JSON-encoded) and/or edited tensors."""
    with safe_open(src, framework="pt") as f:
        metadata = dict(f.metadata())
    state = safetensors.torch.load_file(src)
    for key, value in (meta or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    for key in drop_meta:
        metadata.pop(key)
    if tensors is not None:
        tensors(state)
        metadata.pop("tensors_sha256")   # isolate the check under test from the checksum check
    safetensors.torch.save_file(state, dst, metadata=metadata)
    return dst


# -- round trip --------------------------------------------------------------------------------------
def test_round_trip_float16_gives_the_rounded_weights_and_logits(saved, vocab):
    path, model = saved
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint) and loaded.path == path
    assert not loaded.model.training
    expected = rounded(model)
    state = loaded.model.state_dict()
    assert state.keys() == model.state_dict().keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected.state_dict()[name]), name
        assert torch.allclose(tensor, model.state_dict()[name], rtol=1e-3, atol=1e-4), name
    assert not torch.equal(state["lstm.weight_ih"], model.state_dict()["lstm.weight_ih"])  # really fp16
    assert torch.equal(step_logits(loaded.model), step_logits(expected))
    assert path.stat().st_size < 2 * sum(p.numel() for p in model.parameters()) + 16_000


def test_round_trip_float32_is_exact(tmp_path, vocab):
    model = make_model(seed=3)
    path = save_checkpoint(tmp_path / "f32.safetensors", model, vocab, encoder=ENCODER, training={},
                           dtype=torch.float32)
    loaded = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert torch.equal(step_logits(loaded.model), step_logits(model))
    assert read_metadata(path).dtype == "float32"


def test_metadata_round_trip(saved, vocab):
    path, model = saved
    meta = read_metadata(path)
    assert meta.format_version == "1" and meta.extra == {}
    assert meta.dtype == "float16" and meta.created.startswith("20") and len(meta.tensors_sha256) == 64
    assert meta.model_config == model.config.to_dict() and meta.vocab_size == len(vocab)
    assert Vocabulary.from_dict(meta.vocab).itos == vocab.itos
    assert meta.encoder == {**ENCODER, "fine_tuned": False}
    assert meta.training == TRAINING and meta.decoding == DECODING
    loaded = load_checkpoint(path)
    assert loaded.vocab.itos == vocab.itos
    assert loaded.config == model.config
    assert (loaded.encoder, loaded.training, loaded.decoding) == (meta.encoder, TRAINING, DECODING)
    assert loaded.encoder_state is None


def test_fine_tuned_encoder_state_round_trips_under_its_prefix(tmp_path, vocab):
    encoder_state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    path = save_checkpoint(tmp_path / "ft.safetensors", make_model(), vocab, encoder=ENCODER, training={},
                           encoder_state=encoder_state)
    with safe_open(path, framework="pt") as f:
        assert {"encoder.conv.weight", "encoder.bn.num_batches_tracked"} <= set(f.keys())
    loaded = load_checkpoint(path)
    assert loaded.encoder["fine_tuned"] is True
    assert set(loaded.encoder_state) == set(encoder_state)
    assert loaded.encoder_state["bn.num_batches_tracked"].dtype == torch.int64
    assert int(loaded.encoder_state["bn.num_batches_tracked"]) == 7
    assert torch.equal(loaded.encoder_state["conv.weight"], encoder_state["conv.weight"].half().float())


def test_read_metadata_reads_only_the_header(saved, tmp_path, monkeypatch):
    path, _ = saved
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len:] = bytes(len(data) - 8 - header_len)     # wipe all tensor bytes, keep the size
    wiped = tmp_path / "wiped.safetensors"
    wiped.write_bytes(bytes(data))

    def no_tensors(*args, **kwargs):
        raise AssertionError("read_metadata must not load tensors")
    monkeypatch.setattr(safetensors.torch, "load", no_tensors)
    monkeypatch.setattr(safetensors.torch, "load_file", no_tensors)
    assert read_metadata(wiped).training == TRAINING
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="sha256") as err:   # the full load does notice
        load_checkpoint(wiped)
    assert str(wiped) in str(err.value)


# -- saving refuses bad input ------------------------------------------------------------------------
def test_save_refuses_inconsistent_or_unrepresentable_models(tmp_path, vocab):
    with pytest.raises(CheckpointError, match="vocab has 12 tokens but model_config.vocab_size is 20"):
        save_checkpoint(tmp_path / "m.safetensors", make_model(vocab_size=20), vocab, encoder=ENCODER,
                        training={})
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "m.pt", make_model(), vocab, encoder=ENCODER, training={})
    with pytest.raises(CheckpointError, match="fine_tuned"):
        save_checkpoint(tmp_path / "m.safetensors", make_model(), vocab,
                        encoder={**ENCODER, "fine_tuned": True}, training={})
    big = make_model()
    with torch.no_grad():
        big.classifier.weight[0, 0] = 1e6
    with pytest.raises(CheckpointError, match="overflows float16.*float32"):
        save_checkpoint(tmp_path / "m.safetensors", big, vocab, encoder=ENCODER, training={})
    assert not (tmp_path / "m.safetensors").exists()
    save_checkpoint(tmp_path / "m.safetensors", big, vocab, encoder=ENCODER, training={}, dtype=torch.float32)
    assert load_checkpoint(tmp_path / "m.safetensors").model.classifier.weight[0, 0].item() == 1e6


def test_crash_during_write_leaves_old_checkpoint_intact(saved, vocab, monkeypatch):
    path, model = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, make_model(seed=9), vocab, encoder=ENCODER, training={"epochs": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).training == TRAINING
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temp file left behind


# -- hostile and corrupt files -----------------------------------------------------------------------
class Payload:
    """Unpickling this creates `marker` (builtins.open(marker, 'w')): stands in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payload_is_refused_without_being_unpickled(tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(Payload(control))).close()
    assert control.exists()          # the payload is live: unpickling it does run code

    marker = tmp_path / "marker"
    raw = tmp_path / "evil-pickle.safetensors"
    raw.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    zipped = tmp_path / "evil-torch.safetensors"
    torch.save({"state_dict": Payload(marker)}, zipped)
    for path in (raw, zipped):
        for fn in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match="not a CaptionScope checkpoint") as err:
                fn(path)
            assert str(path) in str(err.value)
    assert not marker.exists()


def test_missing_file_random_bytes_and_directories(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_metadata(tmp_path)
    rng = random.Random(0)
    cases = {"random.safetensors": rng.randbytes(4096),
             "badjson.safetensors": struct.pack("<Q", 100) + rng.randbytes(200),
             "text.safetensors": b"this is a text file, not a checkpoint\n" * 10,
             "empty.safetensors": b""}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated or not a safetensors file") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_truncated_files_are_refused_at_every_cut(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    cuts = {"in-length": 5, "after-length": 8, "in-header": 8 + header_len // 2,
            "in-data": 8 + header_len + 10, "last-byte": len(data) - 1}
    for where, cut in cuts.items():
        cut_path = tmp_path / f"cut-{where}.safetensors"
        cut_path.write_bytes(data[:cut])
        for fn in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match="truncated") as err:
                fn(cut_path)
            assert str(cut_path) in str(err.value), where


def bigger_vocab(n: int) -> dict:
    return Vocabulary(itos=list(SPECIALS) + WORDS + [f"w{i}" for i in range(n)]).to_dict()


def config_with(**changes) -> dict:
    return {**make_model().config.to_dict(), **changes}


MISMATCHES = {
    "vocab-vs-config": (dict(meta={"vocab": bigger_vocab(1)}),
                        "vocab has 13 tokens but model_config.vocab_size is 12"),
    "vocab-vs-weights": (dict(meta={"vocab": bigger_vocab(1), "model_config": config_with(vocab_size=13)}),
                         "vocab size mismatch: embedding.weight has 12 rows"),
    "classifier-rows": (dict(tensors=lambda s: s.update({"classifier.weight": torch.zeros(13, 8),
                                                         "classifier.bias": torch.zeros(13)})),
                        "vocab size mismatch: classifier.weight has 13 rows"),
    "encoder-dim": (dict(meta={"model_config": config_with(encoder_dim=32)}), "encoder_dim mismatch"),
    "changed-shape": (dict(tensors=lambda s: s.update({"f_beta.weight": torch.zeros(2, 8)})),
                      r"shape mismatch for f_beta.weight: file has \[2, 8\], model_config expects \[1, 8\]"),
    "missing-key": (dict(tensors=lambda s: s.pop("init_c.bias")), r"missing 1 tensor\(s\): init_c.bias"),
    "extra-key": (dict(tensors=lambda s: s.update({"bogus.weight": torch.zeros(3)})),
                  r"unexpected 1 tensor\(s\): bogus.weight"),
    "deep-output-flag": (dict(meta={"model_config": config_with(deep_output=False)}),
                         r"unexpected 4 tensor\(s\): out_h.bias, out_h.weight, out_z.bias, out_z.weight\)"),
    "many-missing": (dict(tensors=lambda s: [s.pop(k) for k in list(s) if k.startswith(("attention.", "lstm."))]),
                     r"missing 10 tensor\(s\): attention.decoder_proj.bias, (\S+, ){4}\.\.\.\)"),
    "integer-weights": (dict(tensors=lambda s: s.update({"f_beta.bias": torch.zeros(1, dtype=torch.int32)})),
                        "f_beta.bias has dtype I32"),
    "nan-weights": (dict(tensors=lambda s: s["lstm.bias_hh"].__setitem__(0, float("nan"))),
                    "'lstm.bias_hh' contains NaN"),
    "format-marker": (dict(meta={"format": "someone-elses-model"}), "is not a CaptionScope checkpoint"),
    "no-format": (dict(drop_meta=["format"]), "is not a CaptionScope checkpoint"),
    "version": (dict(meta={"format_version": "2"}), "format_version '2' is not supported"),
    "missing-meta": (dict(drop_meta=["vocab"]), "metadata is missing vocab"),
    "bad-json": (dict(meta={"model_config": "{not json"}), "'model_config' is not valid JSON"),
    "config-not-object": (dict(meta={"training": "[1, 2]"}), "'training' must be a JSON object"),
    "bad-config-value": (dict(meta={"model_config": config_with(decoder_dim=-8)}),
                         "model_config.decoder_dim must be a positive integer"),
    "unknown-config-key": (dict(meta={"model_config": config_with(heads=4)}), "unknown model config keys"),
    "bad-vocab": (dict(meta={"vocab": {"itos": ["a", "b"]}}), "itos must start with"),
    "fine-tuned-flag": (dict(meta={"encoder": {**ENCODER, "fine_tuned": True}}),
                        "fine_tuned=True but the file has no 'encoder.\\*' tensors"),
}


@pytest.mark.parametrize("case", MISMATCHES, ids=list(MISMATCHES))
def test_metadata_weights_mismatches_are_named(saved, tmp_path, case):
    edits, message = MISMATCHES[case]
    path = rewrite(saved[0], tmp_path / f"{case}.safetensors", **edits)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_plain_safetensors_without_our_metadata_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(make_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a CaptionScope checkpoint") as err:
        read_metadata(path)
    assert str(path) in str(err.value)


def test_flipped_byte_in_tensor_data_is_detected(saved, tmp_path):
    data = bytearray(saved[0].read_bytes())
    data[-3] ^= 0x40
    path = tmp_path / "bitrot.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load_checkpoint(path)


# -- picking files -----------------------------------------------------------------------------------
def test_resolve_checkpoint_stays_inside_its_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "b.safetensors").write_bytes(b"x")
    (folder / "a.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.safetensors").write_bytes(b"x")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    (folder / "escape.safetensors").symlink_to(outside)
    (folder / "alias.safetensors").symlink_to(folder / "a.safetensors")

    assert list_checkpoints(folder) == [folder / n for n in ("a.safetensors", "alias.safetensors", "b.safetensors")]
    assert list_checkpoints(tmp_path / "missing") == []
    assert resolve_checkpoint("a.safetensors", folder) == folder / "a.safetensors"
    assert resolve_checkpoint("alias.safetensors", folder) == folder / "alias.safetensors"
    for hostile in ("../outside.safetensors", "/etc/passwd", str(folder / "a.safetensors"),
                    "sub/c.safetensors", "..", "", "a.safetensors\x00", "..\\outside.safetensors"):
        with pytest.raises(CheckpointError, match="not a checkpoint file name"):
            resolve_checkpoint(hostile, folder)
    with pytest.raises(CheckpointError, match="points outside"):
        resolve_checkpoint("escape.safetensors", folder)
    with pytest.raises(CheckpointError, match=r"end in \.safetensors"):
        resolve_checkpoint("notes.txt", folder)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint("zzz.safetensors", folder)
    assert resolve_checkpoint(outside, folder, allow_outside=True) == outside
    assert resolve_checkpoint("b.safetensors", folder, allow_outside=True) == folder / "b.safetensors"


def test_default_checkpoint_path_explains_how_to_get_one(tmp_path, monkeypatch):
    assert ckpt.DEFAULT_CHECKPOINT_DIR == Path(ckpt.__file__).resolve().parent.parent / "checkpoints"
    monkeypatch.setattr(ckpt, "DEFAULT_CHECKPOINT_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="captionscope-lite2.safetensors.*core.train"):
        default_checkpoint_path()
    assert default_checkpoint_path(must_exist=False) == tmp_path / "captionscope-lite2.safetensors"
    (tmp_path / "captionscope-lite2.safetensors").write_bytes(b"x")
    assert default_checkpoint_path() == tmp_path / "captionscope-lite2.safetensors"


def test_checkpoint_round_trip_gives_identical_captions(tmp_path, vocab):
    from core.decoding import DecodingConfig, generate
    model = make_model(seed=4)
    with torch.no_grad():
        model.classifier.bias[vocab.end_id] -= 3.0     # a random model would often stop at once
    path = save_checkpoint(tmp_path / "half.safetensors", model, vocab, encoder=ENCODER, training={})
    exact = save_checkpoint(tmp_path / "exact.safetensors", model, vocab, encoder=ENCODER, training={},
                            dtype=torch.float32)
    features = torch.randn(4, model.config.num_regions, model.config.encoder_dim,
                           generator=torch.Generator().manual_seed(5))
    for beam in (1, 3):
        config = DecodingConfig(beam_size=beam, max_length=12, num_return_sequences=1)

        def captions(m):
            return [[h.token_ids for h in hyps] for hyps in generate(m, features, config)]
        assert captions(load_checkpoint(path).model) == captions(rounded(model))
        assert captions(load_checkpoint(exact).model) == captions(model)
        assert any(ids for per_image in captions(model) for ids in per_image)   # really produced words


def test_uploaded_checkpoint_is_validated_before_it_reaches_the_folder(saved, tmp_path):
    path, _ = saved
    folder = tmp_path / "uploads"
    with pytest.raises(CheckpointError, match="my_model.safetensors") as err:
        save_uploaded_checkpoint(folder, "my model.safetensors", path.read_bytes()[:-10])
    assert ".upload-" not in str(err.value)                     # the cleaned name, not the temp file
    assert list_checkpoints(folder) == [] and not any(folder.iterdir())
    kept = save_uploaded_checkpoint(folder, "../my model.safetensors", path.read_bytes())
    assert kept == folder / "my_model.safetensors" and list_checkpoints(folder) == [kept]
    assert read_metadata(kept).training == TRAINING
    # another file under the same name does not overwrite the first one
    other = save_checkpoint(tmp_path / "other.safetensors", make_model(seed=1), Vocabulary(list(SPECIALS) + WORDS),
                            encoder=ENCODER, training=TRAINING)
    second = save_uploaded_checkpoint(folder, "my model.safetensors", other.read_bytes())
    assert second != kept and sorted(list_checkpoints(folder)) == sorted([kept, second])


@pytest.mark.parametrize("raw,kept", [
    ("my model.safetensors", "my_model.safetensors"),
    ("evil\u202egnp.safetensors", "evil_gnp.safetensors"),      # the bidi override never reaches the disk
    ("../../etc/passwd.safetensors", "passwd.safetensors"),
    ("\u202e.safetensors", "checkpoint.safetensors"),
    ("x" * 1000 + ".safetensors", "x" * 100 + ".safetensors"),  # no 'file name too long' on save
])
def test_upload_file_name_is_ascii_short_and_inside_the_folder(raw, kept):
    from core.checkpoint import upload_file_name
    assert upload_file_name(raw) == kept


def test_store_decoding_defaults_keeps_the_weights_bit_for_bit(tiny_checkpoint, tmp_path):
    """Tuned decoding defaults are written into a copy of the checkpoint; its tensors are unchanged."""
    import shutil

    from core.checkpoint import store_decoding_defaults
    from core.decoding import DecodingConfig
    path = shutil.copyfile(tiny_checkpoint, tmp_path / "tuned.safetensors")
    before = load_checkpoint(path)
    tuned = DecodingConfig(beam_size=5, length_penalty=0.5, max_length=22)
    store_decoding_defaults(path, tuned.to_dict(), {"split": "dev", "by": "CIDEr-D"})
    after = load_checkpoint(path)
    assert after.metadata.decoding_config() == tuned and after.training["decoding_tuned"]["by"] == "CIDEr-D"
    assert after.metadata.tensors_sha256 == before.metadata.tensors_sha256
    assert all(torch.equal(a, b) for a, b in zip(after.model.state_dict().values(), before.model.state_dict().values()))
