"""Flickr8K (and Karpathy-json Flickr30k/COCO) loading.

Three on-disk forms circulate and all are accepted, so users point at whatever copy they have:
  official   `Flickr8k.token.txt` ("<image>#<n><TAB><caption>") + `Flickr_8k.{train,dev,test}Images.txt`
  kaggle     `captions.txt` (CSV, header "image,caption"); split lists are used if also present, else "all"
  karpathy   `dataset_*.json` (Karpathy's splits; "val" -> "dev", "restval" -> "train")
Text files may sit in the data folder or in `Flickr8k_text/`; images in one of `IMAGE_DIR_NAMES`.

Bad files raise DataError naming file and line. Missing images are not fatal (copies of the dataset often
lack a few): their captions are skipped and reported in `CaptionDataset.warnings`. Existence is checked
against one `os.listdir` per folder, not one stat per caption, so the real 8K copy loads in well under 1 s.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError

SPLITS = ("train", "dev", "test")
IMAGE_DIR_NAMES = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
TEXT_DIR_NAMES = (".", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_FILE = "captions.txt"
SPLIT_FILES = {split: f"Flickr_8k.{split}Images.txt" for split in SPLITS}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "dev": "dev", "test": "test"}
ENV_VAR = "FLICKR8K_DIR"
_FIRST_FEW = 3
# What a sane captions file looks like: Flickr8K/30k have 5 references per image (COCO 5-7), each a sentence
# (Flickr8K's longest: 199 characters). Far more is a broken or padded file: loaded, but warned about.
USUAL_MAX_REFERENCES = 20
USUAL_MAX_CAPTION_CHARS = 500

_TOKEN_LINE = re.compile(r"(\S+?)#(\d+)\s+(\S.*)")
# The official token file names one image "2258277193_586949ec62.jpg.1"; the file is "....jpg".
_PSEUDO_ENTRY = re.compile(r"(.+\.(?:jpe?g|png))\.\d+", re.IGNORECASE)


@dataclass(frozen=True)
class ImageCaptions:
    image: str                 # file name, e.g. "1000268201_693b08cb0e.jpg"
    path: Path                 # absolute path of the image file
    captions: tuple[str, ...]  # raw caption strings (not tokenised), in file order


@dataclass
class CaptionDataset:
    root: Path
    images_dir: Path
    splits: dict[str, list[ImageCaptions]]   # "train"/"dev"/"test" (or "all"); a split with no list is absent
    source_format: str                       # "official" | "kaggle" | "karpathy"
    warnings: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[ImageCaptions]:
        name = "dev" if name == "val" else name
        if name not in self.splits:
            available = ", ".join(self.splits) or "none"
            raise DataError(f"{self.root}: no split {name!r} (available: {available})")
        return self.splits[name]

    @property
    def browse_split(self) -> str | None:
        """The split the dashboard shows: "dev", else the first one there is (None for no splits)."""
        return "dev" if "dev" in self.splits else next(iter(self.splits), None)


def normalise_image_name(name: str) -> str:
    """Map the pseudo-entry "x.jpg.1" to the real file "x.jpg"; other names unchanged."""
    match = _PSEUDO_ENTRY.fullmatch(name)
    return match.group(1) if match else name


# ----------------------------------------------------------------------------- parsers (text -> python)

def parse_token_text(text: str, source: str = TOKEN_FILE) -> dict[str, list[str]]:
    """Official token file -> {image: [captions in file order]}."""
    captions: dict[str, list[str]] = {}
    for lineno, line in _lines(text):
        match = _TOKEN_LINE.fullmatch(line)
        if not match:
            raise DataError(f"{source}:{lineno}: expected '<image>#<n><TAB><caption>', got {line[:60]!r}")
        raw_name, caption = match.group(1), match.group(3).strip()
        name = normalise_image_name(raw_name)
        existing = captions.setdefault(name, [])
        if name != raw_name and caption in existing:
            continue  # pseudo-entry repeating a caption the real entry already has
        existing.append(caption)
    return captions


def parse_split_text(text: str, source: str) -> list[str]:
    """Split list (one image file name per line) -> names in file order, duplicates dropped."""
    names: dict[str, None] = {}
    for lineno, line in _lines(text):
        if len(line.split()) != 1 or "/" in line or "\\" in line:
            raise DataError(f"{source}:{lineno}: expected one image file name per line, got {line[:60]!r}")
        names.setdefault(normalise_image_name(line), None)
    return list(names)


def parse_kaggle_text(text: str, source: str = KAGGLE_FILE) -> dict[str, list[str]]:
    """Kaggle CSV ("image,caption" header) -> {image: [captions]}. Unquoted commas stay in the caption."""
    reader = csv.reader(io.StringIO(text, newline=""))
    captions: dict[str, list[str]] = {}
    try:
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
            raise DataError(f"{source}:1: expected the header 'image,caption', got {','.join(header or [])[:60]!r}")
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            image = row[0].strip()
            caption = ",".join(row[1:]).strip()
            if len(row) < 2 or not image or not caption or len(image.split()) != 1:
                raise DataError(f"{source}:{reader.line_num}: expected '<image>,<caption>', got {','.join(row)[:60]!r}")
            captions.setdefault(normalise_image_name(image), []).append(caption)
    except csv.Error as e:
        raise DataError(f"{source}:{reader.line_num}: malformed CSV ({e})") from None
    return captions


def parse_karpathy_text(text: str, source: str) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """Karpathy json -> (captions {image: [raw]}, splits {split: [image]}, subfolders {image: filepath})."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{source}: expected a JSON object with an 'images' list")
    captions: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    subdirs: dict[str, str] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{source}: images[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        name, filepath, split = entry.get("filename"), entry.get("filepath", ""), entry.get("split")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{where}: 'filename' must be a plain file name, got {name!r}")
        if not isinstance(filepath, str) or filepath.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", filepath):
            raise DataError(f"{where}: 'filepath' must be a relative folder, got {filepath!r}")
        if not isinstance(split, str) or split not in KARPATHY_SPLITS:
            raise DataError(f"{where}: unknown split {split!r} (expected one of {sorted(KARPATHY_SPLITS)})")
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list):
            raise DataError(f"{where}: 'sentences' must be a list")
        texts = [_sentence_text(s, f"{where}.sentences[{i}]") for i, s in enumerate(sentences)]
        name = normalise_image_name(name)
        captions.setdefault(name, []).extend(texts)
        splits.setdefault(KARPATHY_SPLITS[split], []).append(name)
        if filepath:
            subdirs[name] = filepath
    return captions, splits, subdirs


def _sentence_text(sentence: Any, where: str) -> str:
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str) and sentence["raw"].strip():
        return sentence["raw"].strip()
    tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
    if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    raise DataError(f"{where}: expected an object with a non-empty 'raw' string or 'tokens' list")


def _lines(text: str):
    """(line number, stripped line) for non-blank lines. Splits on "\\n" only, so numbers match editors."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if line:
            yield lineno, line


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path.name}:{lineno}: not UTF-8 text ({e.reason})") from None


# ----------------------------------------------------------------------------- layout + assembly

def find_data_dir_from_env() -> Path | None:
    """The folder named by $FLICKR8K_DIR, or None when unset (load_dataset reports a wrong path clearly)."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def _find_text_file(root: Path, name: str) -> Path | None:
    for sub in TEXT_DIR_NAMES:
        candidate = root / sub / name
        if candidate.is_file():
            return candidate
    return None


def _find_karpathy_json(root: Path) -> Path | None:
    found = sorted({p for sub in TEXT_DIR_NAMES if (root / sub).is_dir() for p in (root / sub).glob("dataset_*.json")})
    if not found:
        return None
    preferred = [p for p in found if p.name == "dataset_flickr8k.json"]
    if preferred:
        return preferred[0]
    if len(found) > 1:
        raise DataError(f"{root}: several Karpathy files ({', '.join(p.name for p in found)}); "
                        "point data_dir at a folder with only one")
    return found[0]


def _find_images_dir(root: Path, allow_root: bool) -> Path:
    for name in IMAGE_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    if allow_root:
        return root
    raise DataError(f"{root}: no images folder (looked for {', '.join(n + '/' for n in IMAGE_DIR_NAMES)}); "
                    "pass images_dir")


def load_dataset(data_dir: str | Path, images_dir: str | Path | None = None) -> CaptionDataset:
    """Load whichever supported form `data_dir` holds (official > kaggle > karpathy if several)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (set {ENV_VAR} or pass the folder)")
    root = root.resolve()
    subdirs: dict[str, str] = {}
    split_images: dict[str, list[str]] = {}

    token_file = _find_text_file(root, TOKEN_FILE)
    kaggle_file = _find_text_file(root, KAGGLE_FILE)
    if token_file or kaggle_file:
        source_format = "official" if token_file else "kaggle"
        caption_file = token_file or kaggle_file
        parse = parse_token_text if token_file else parse_kaggle_text
        captions = parse(_read_text(caption_file), caption_file.name)
        for split, file_name in SPLIT_FILES.items():
            split_file = _find_text_file(root, file_name)
            if split_file:
                split_images[split] = parse_split_text(_read_text(split_file), split_file.name)
        if not split_images:
            split_images["all"] = list(captions)
    else:
        json_file = _find_karpathy_json(root)
        if json_file is None:
            raise DataError(f"{root}: no caption file found (looked for {TOKEN_FILE}, {KAGGLE_FILE}, dataset_*.json "
                            f"in the folder and in Flickr8k_text/)")
        source_format = "karpathy"
        captions, split_images, subdirs = parse_karpathy_text(_read_text(json_file), json_file.name)
        split_images = {s: split_images[s] for s in SPLITS if s in split_images}

    if images_dir is not None:
        images_root = Path(images_dir).expanduser()
        if not images_root.is_dir():
            raise DataError(f"{images_root}: images folder not found")
    else:
        images_root = _find_images_dir(root, allow_root=bool(subdirs))
    images_root = images_root.resolve()
    splits, warnings = _assemble(images_root, captions, split_images, subdirs)
    return CaptionDataset(root=root, images_dir=images_root, splits=splits,
                          source_format=source_format, warnings=warnings)


def _assemble(images_root: Path, captions: dict[str, list[str]], split_images: dict[str, list[str]],
              subdirs: dict[str, str]) -> tuple[dict[str, list[ImageCaptions]], list[str]]:
    listings: dict[Path, set[str]] = {}

    def image_path(name: str) -> Path | None:
        folder = images_root / subdirs[name] if name in subdirs else images_root
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        return folder / name if name in listings[folder] else None

    paths = {name: image_path(name) for name in captions}
    warnings: list[str] = []
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        n_captions = sum(len(captions[name]) for name in missing)
        warnings.append(f"{n_captions} captions skipped: image file missing ({len(missing)} images; "
                        f"first: {_first_few(missing)})")

    splits: dict[str, list[ImageCaptions]] = {}
    owner: dict[str, str] = {}
    in_two_splits: list[str] = []
    for split, names in split_images.items():
        uncaptioned = [name for name in names if not captions.get(name)]
        if uncaptioned:
            warnings.append(f"{split}: {len(uncaptioned)} listed images have no captions "
                            f"(first: {_first_few(uncaptioned)})")
        items = []
        for name in names:
            if owner.setdefault(name, split) != split:
                in_two_splits.append(name)
            path = paths.get(name)
            if path is not None and captions.get(name):
                items.append(ImageCaptions(image=name, path=path, captions=tuple(captions[name])))
        splits[split] = items
    if in_two_splits:
        warnings.append(f"{len(in_two_splits)} images are listed in more than one split "
                        f"(first: {_first_few(in_two_splits)})")
    return splits, warnings + unusual_captions([it for items in splits.values() for it in items])


def unusual_captions(items: list[ImageCaptions]) -> list[str]:
    """Warnings for images with far more references, or captions far longer, than a captioning dataset has."""
    warnings = []
    crowded = sorted((it for it in items if len(it.captions) > USUAL_MAX_REFERENCES), key=lambda it: -len(it.captions))
    if crowded:
        warnings.append(f"{len(crowded)} images have more than {USUAL_MAX_REFERENCES} references (usual: 5; most: "
                        f"{len(crowded[0].captions):,} for {crowded[0].image}); tables show the first few")
    long = [it.image for it in items if max(map(len, it.captions), default=0) > USUAL_MAX_CAPTION_CHARS]
    if long:
        warnings.append(f"{len(long)} images have captions over {USUAL_MAX_CAPTION_CHARS} characters "
                        f"(first: {_first_few(long)}); pages show them cut")
    return warnings


def _first_few(names: list[str]) -> str:
    more = ", ..." if len(names) > _FIRST_FEW else ""
    return ", ".join(names[:_FIRST_FEW]) + more


def dataset_summary(ds: CaptionDataset) -> dict[str, Any]:
    """JSON-safe overview for the dashboard and CLIs: images/captions per split, format, warnings."""
    per_split = {name: {"images": len(items), "captions": sum(len(i.captions) for i in items)}
                 for name, items in ds.splits.items()}
    return {
        "root": str(ds.root),
        "images_dir": str(ds.images_dir),
        "format": ds.source_format,
        "splits": per_split,
        "images": sum(s["images"] for s in per_split.values()),
        "captions": sum(s["captions"] for s in per_split.values()),
        "warnings": list(ds.warnings),
    }
