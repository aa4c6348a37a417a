"""Flickr8K loading: the three formats, layout discovery, broken files, missing images, summary."""
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from core.data import (ImageCaptions, dataset_summary, find_data_dir_from_env, load_dataset,
                       normalise_image_name, parse_kaggle_text, parse_token_text)
from core.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"{1000 + i}_abc.jpg" for i in range(6)]


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 6), (40 * i % 256, 10, 200)).save(folder / name, format="JPEG")


def caption(name: str, n: int) -> str:
    return f"caption {n} of {name.split('_')[0]} ."


def write_official(root: Path, names=NAMES, captions_per_image=5, splits=None, text_dir="."):
    """Official layout; `splits` maps split -> image names (default train 0-3, dev 4, test 5)."""
    splits = splits if splits is not None else {"train": names[:4], "dev": names[4:5], "test": names[5:]}
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}#{n}\t{caption(name, n)}" for name in names for n in range(captions_per_image)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, split_names in splits.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in split_names))


@pytest.mark.parametrize("image_dir_name", ["images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset"])
def test_official_format_with_image_folder_discovery(tmp_path, image_dir_name):
    write_images(tmp_path / image_dir_name, NAMES)
    write_official(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.source_format == "official"
    assert ds.images_dir == (tmp_path / image_dir_name).resolve()
    assert list(ds.splits) == ["train", "dev", "test"]
    assert [item.image for item in ds.split("train")] == NAMES[:4]
    first = ds.split("train")[0]
    assert isinstance(first, ImageCaptions)
    assert first.path.is_absolute() and first.path.is_file()
    assert first.captions == tuple(caption(NAMES[0], n) for n in range(5))
    assert ds.warnings == []


def test_text_files_in_flickr8k_text_folder_and_explicit_images_dir(tmp_path):
    write_images(tmp_path / "elsewhere", NAMES)
    write_official(tmp_path, text_dir="Flickr8k_text")
    ds = load_dataset(tmp_path, images_dir=tmp_path / "elsewhere")
    assert ds.images_dir == (tmp_path / "elsewhere").resolve()
    assert len(ds.split("dev")) == 1 and ds.split("dev")[0].image == NAMES[4]


def test_split_without_list_file_is_absent_and_split_error_names_available(tmp_path):
    write_images(tmp_path / "images", NAMES)
    write_official(tmp_path, splits={"train": NAMES[:4], "dev": NAMES[4:]})
    ds = load_dataset(tmp_path)
    assert list(ds.splits) == ["train", "dev"]
    assert ds.split("val") is ds.split("dev")
    with pytest.raises(DataError, match=r"no split 'test' \(available: train, dev\)"):
        ds.split("test")


def test_missing_images_are_skipped_and_reported(tmp_path):
    write_images(tmp_path / "images", NAMES[:3])  # 3 of 6 images present
    write_official(tmp_path)
    ds = load_dataset(tmp_path)
    assert [i.image for i in ds.split("train")] == NAMES[:3]
    assert ds.split("dev") == [] and ds.split("test") == []
    assert len(ds.warnings) == 1
    warning = ds.warnings[0]
    assert warning.startswith("15 captions skipped: image file missing (3 images")
    assert NAMES[3] in warning and NAMES[4] in warning


def test_split_list_images_without_captions_are_reported(tmp_path):
    write_images(tmp_path / "images", NAMES + ["9999_nocap.jpg"])
    write_official(tmp_path, splits={"train": NAMES[:4] + ["9999_nocap.jpg"], "dev": NAMES[4:]})
    ds = load_dataset(tmp_path)
    assert len(ds.split("train")) == 4
    assert any("train: 1 listed images have no captions" in w and "9999_nocap.jpg" in w for w in ds.warnings)


def test_image_in_two_splits_is_reported(tmp_path):
    write_images(tmp_path / "images", NAMES)
    write_official(tmp_path, splits={"train": NAMES[:4], "dev": NAMES[3:5]})
    ds = load_dataset(tmp_path)
    assert any("1 images are listed in more than one split" in w and NAMES[3] in w for w in ds.warnings)


def test_pseudo_entry_is_mapped_to_the_real_image(tmp_path):
    real = "2258277193_586949ec62.jpg"
    write_images(tmp_path / "images", [real, NAMES[0]])
    lines = [f"{NAMES[0]}#0\tone", f"{real}.1#0\tA dog .", f"{real}.1#1\tA cat ."]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text(f"{NAMES[0]}\n{real}\n")
    ds = load_dataset(tmp_path)
    assert [(i.image, i.captions) for i in ds.split("train")] == [(NAMES[0], ("one",)), (real, ("A dog .", "A cat ."))]
    assert ds.warnings == []
    assert normalise_image_name(real + ".1") == real
    assert normalise_image_name(real) == real


def test_pseudo_entry_duplicates_of_real_entry_are_not_doubled():
    real = "2258277193_586949ec62.jpg"
    text = f"{real}#0\tA dog .\n{real}.1#0\tA dog .\n{real}.1#1\tA new one .\n"
    assert parse_token_text(text) == {real: ["A dog .", "A new one ."]}


@pytest.mark.parametrize("bad_line", ["no tab or hash here", "img.jpg\tcaption without number",
                                      "img.jpg#x\tcaption", "img.jpg#0\t   "])
def test_malformed_token_line_names_file_and_line(tmp_path, bad_line):
    write_images(tmp_path / "images", NAMES[:1])
    good = [f"{NAMES[0]}#{n}\tfine caption" for n in range(3)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(good[:2] + ["", bad_line] + good[2:]) + "\n")
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:4: expected '<image>#<n><TAB><caption>'"):
        load_dataset(tmp_path)


def test_malformed_split_list_names_file_and_line(tmp_path):
    write_images(tmp_path / "images", NAMES)
    write_official(tmp_path)
    (tmp_path / "Flickr_8k.devImages.txt").write_text(f"{NAMES[4]}\ntwo names.jpg\n")
    with pytest.raises(DataError, match=r"Flickr_8k\.devImages\.txt:2: expected one image file name per line"):
        load_dataset(tmp_path)


def test_non_utf8_caption_file_names_line(tmp_path):
    write_images(tmp_path / "images", NAMES[:1])
    (tmp_path / "Flickr8k.token.txt").write_bytes(f"{NAMES[0]}#0\tok\n{NAMES[0]}#1\tbad \xff\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:2: not UTF-8"):
        load_dataset(tmp_path)


def write_kaggle(root: Path, rows: list[str]) -> None:
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")


def test_kaggle_csv_with_quoted_and_unquoted_commas(tmp_path):
    write_images(tmp_path / "Images", NAMES[:2])
    write_kaggle(tmp_path, [
        f'{NAMES[0]},"A dog, brown, runs ."',
        f"{NAMES[0]},A dog , unquoted , commas .",
        f'{NAMES[1]},"He said ""hi"" ."',
    ])
    ds = load_dataset(tmp_path)
    assert ds.source_format == "kaggle"
    assert list(ds.splits) == ["all"]
    items = {i.image: i.captions for i in ds.split("all")}
    assert items == {NAMES[0]: ("A dog, brown, runs .", "A dog , unquoted , commas ."),
                     NAMES[1]: ('He said "hi" .',)}


def test_kaggle_uses_split_lists_when_present(tmp_path):
    write_images(tmp_path / "Images", NAMES[:3])
    write_kaggle(tmp_path, [f"{name},caption {name}" for name in NAMES[:3]])
    (tmp_path / "Flickr_8k.trainImages.txt").write_text(f"{NAMES[0]}\n{NAMES[1]}\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text(f"{NAMES[2]}\n")
    ds = load_dataset(tmp_path)
    assert list(ds.splits) == ["train", "test"]
    assert [i.image for i in ds.split("test")] == [NAMES[2]]


def test_kaggle_bad_header_and_bad_row(tmp_path):
    write_images(tmp_path / "Images", NAMES[:1])
    (tmp_path / "captions.txt").write_text(f"file,text\n{NAMES[0]},x\n")
    with pytest.raises(DataError, match=r"captions\.txt:1: expected the header 'image,caption'"):
        load_dataset(tmp_path)
    write_kaggle(tmp_path, [f"{NAMES[0]},fine", f"{NAMES[0]},also fine", "only-one-field"])
    with pytest.raises(DataError, match=r"captions\.txt:4: expected '<image>,<caption>'"):
        load_dataset(tmp_path)
    assert parse_kaggle_text("image,caption\n\n" + f"{NAMES[0]},x\n") == {NAMES[0]: ["x"]}


def karpathy_entry(name, split, sentences, filepath=None):
    entry = {"filename": name, "split": split, "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def test_karpathy_json_split_mapping(tmp_path):
    write_images(tmp_path / "images", NAMES[:5])
    entries = [karpathy_entry(NAMES[0], "train", ["a b", "c d"]), karpathy_entry(NAMES[1], "restval", ["e"]),
               karpathy_entry(NAMES[2], "val", ["f"]), karpathy_entry(NAMES[3], "test", ["g"]),
               {"filename": NAMES[4], "split": "test", "sentences": [{"tokens": ["only", "tokens"]}]},
               karpathy_entry(NAMES[5], "train", ["missing image"])]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    ds = load_dataset(tmp_path)
    assert ds.source_format == "karpathy"
    assert list(ds.splits) == ["train", "dev", "test"]
    assert [(i.image, i.captions) for i in ds.split("train")] == [(NAMES[0], ("a b", "c d")), (NAMES[1], ("e",))]
    assert [i.image for i in ds.split("dev")] == [NAMES[2]]
    assert [i.captions for i in ds.split("test")] == [("g",), ("only tokens",)]
    assert ds.warnings and "1 captions skipped: image file missing" in ds.warnings[0]


def test_karpathy_coco_style_filepath(tmp_path):
    write_images(tmp_path / "train2014", ["COCO_train2014_1.jpg"])
    write_images(tmp_path / "val2014", ["COCO_val2014_2.jpg"])
    entries = [karpathy_entry("COCO_train2014_1.jpg", "train", ["x"], filepath="train2014"),
               karpathy_entry("COCO_val2014_2.jpg", "val", ["y"], filepath="val2014")]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    ds = load_dataset(tmp_path)
    assert ds.split("dev")[0].path == (tmp_path / "val2014" / "COCO_val2014_2.jpg").resolve()
    assert ds.split("train")[0].path.is_file()
    assert ds.warnings == []


@pytest.mark.parametrize("content, message", [
    ('{"images": [\n  {"filename": "a.jpg",\n  }]}', r"dataset_flickr8k\.json:3: invalid JSON"),
    ('[1, 2]', r"expected a JSON object with an 'images' list"),
    ('{"images": [{"filename": "a.jpg", "split": "bogus", "sentences": []}]}', r"images\[0\]: unknown split 'bogus'"),
    ('{"images": [{"split": "train", "sentences": []}]}', r"images\[0\]: 'filename'"),
    ('{"images": [{"filename": "a.jpg", "filepath": "../..", "split": "train", "sentences": []}]}', r"'filepath'"),
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": 3}]}]}',
     r"images\[0\]\.sentences\[0\]"),
])
def test_karpathy_bad_json_is_reported(tmp_path, content, message):
    write_images(tmp_path / "images", ["a.jpg"])
    (tmp_path / "dataset_flickr8k.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


def test_missing_folder_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no caption file found"):
        load_dataset(tmp_path)
    write_official(tmp_path)
    with pytest.raises(DataError, match="no images folder"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="images folder not found"):
        load_dataset(tmp_path, images_dir=tmp_path / "nope")


def test_find_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FLICKR8K_DIR", raising=False)
    assert find_data_dir_from_env() is None
    monkeypatch.setenv("FLICKR8K_DIR", str(tmp_path))
    assert find_data_dir_from_env() == tmp_path


def test_dataset_summary(tmp_path):
    write_images(tmp_path / "images", NAMES[:5])
    write_official(tmp_path, captions_per_image=2)
    summary = dataset_summary(load_dataset(tmp_path))
    assert summary["format"] == "official"
    assert summary["splits"] == {"train": {"images": 4, "captions": 8}, "dev": {"images": 1, "captions": 2},
                                 "test": {"images": 0, "captions": 0}}
    assert summary["images"] == 5 and summary["captions"] == 10
    assert len(summary["warnings"]) == 1
    json.dumps(summary)  # JSON-safe for the dashboard


def real_flickr8k_dir() -> Path | None:
    candidates = [os.environ.get("FLICKR8K_DIR"), REPO_ROOT.parent / "shared" / "flickr8k"]
    for c in candidates:
        if c and (Path(c) / "Flickr8k.token.txt").is_file():
            return Path(c)
    return None


@pytest.mark.skipif(real_flickr8k_dir() is None, reason="real Flickr8K copy not available")
def test_real_flickr8k_loads_fast():
    start = time.perf_counter()
    ds = load_dataset(real_flickr8k_dir())
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"loading took {elapsed:.2f}s"
    assert len(ds.split("train")) == 6000 and len(ds.split("dev")) == 1000
    assert all(len(item.captions) == 5 for split in ds.splits.values() for item in split)
    assert ds.split("train")[0].path.is_file()


def test_karpathy_split_that_is_not_a_string_is_a_clear_error():
    import json as _json
    from core.data import parse_karpathy_text
    with pytest.raises(DataError, match="unknown split"):
        parse_karpathy_text(_json.dumps({"images": [{"filename": "a.jpg", "split": [], "sentences": []}]}), "d.json")


def test_a_token_file_with_far_too_many_references_loads_with_a_warning(tmp_path):
    """1M lines for 6 images loaded silently and hung the browser tab; now the loader says what is odd."""
    from core.data import USUAL_MAX_REFERENCES
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"x")
        count = 5 if i == 0 else 2000
        lines += [f"{i}.jpg#{k}\ta dog runs on the grass number {k}" for k in range(count)]
    lines.append("0.jpg#9\t" + "very long " * 100)
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path)
    assert [len(it.captions) for it in ds.splits["all"]] == [6, 2000, 2000]
    assert any(w.startswith(f"2 images have more than {USUAL_MAX_REFERENCES} references") and "2,000" in w
               for w in ds.warnings), ds.warnings
    assert any("over 500 characters" in w and "0.jpg" in w for w in ds.warnings), ds.warnings


def test_an_ordinary_dataset_gets_no_reference_warnings(tiny_flickr):
    warnings = load_dataset(tiny_flickr).warnings          # (its train and dev lists overlap on purpose)
    assert not [w for w in warnings if "references" in w or "characters" in w], warnings
