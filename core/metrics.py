"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, computed exactly as the COCO caption code does.

Published captioning numbers come from the coco-caption toolkit (here: its pip port, `pycocoevalcap`).
Re-implementing BLEU or CIDEr "the same way" almost never gives the same numbers (tokenisation, the BLEU
reference-length rule, CIDEr's idf over the scored corpus all matter), so we only *drive* pycocoevalcap's
scorers and spend our code on what the toolkit does badly:

- tokenisation: the toolkit's PTBTokenizer (Stanford CoreNLP 3.4.1, needs Java). Without Java we fall back
  to `simple_tokenize`, a pure-python imitation of PTB + the toolkit's punctuation removal, and say so in
  `Scores.notes` (numbers then differ slightly from published ones).
- METEOR runs a long-lived `java -jar meteor-1.5.jar` subprocess. We close it ourselves (the toolkit relies on
  `__del__`, which deadlocks if scoring failed while holding its lock), drain its stderr, sanitise its input
  (its line protocol breaks on newlines and on its '|||' field separator) and put a watchdog on it, so a
  broken Java never hangs an evaluation: METEOR is then skipped with a note. Without Java it is skipped too.
- validation: an image with a prediction but no references is a `DataError` naming it.

CIDEr-D: pycocoevalcap's `Cider` *is* coco-caption's CIDEr-D (checked in pycocoevalcap/cider/cider_scorer.py:
Gaussian length penalty with sigma=6.0, clipping of candidate tf-idf by the reference's ("vrama91: added
clipping"), mean over n=1..4, divided by the number of references, times 10). The old, un-clipped CIDEr is not
what it computes. CIDEr-D's idf comes from the references of the images being scored, so it is a corpus
metric: per-image values depend on which other images are in the batch, and a single image always gets 0.

BLEU: corpus BLEU is computed from n-gram counts pooled over the corpus ("closest" reference length), which is
not the mean of the per-image BLEU values; both come from the same `Bleu.compute_score` call. METEOR's corpus
value is likewise the jar's aggregate, not a mean. ROUGE-L and CIDEr-D corpus values are per-image means.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from core.errors import ConfigError, DataError

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
TOKENIZERS = ("ptb", "auto", "simple")
BLEU_NAMES = METRIC_NAMES[:4]

JAVA_MISSING_NOTE = "METEOR skipped: Java not found (install a JRE, e.g. apt-get install default-jre-headless)"
# The METEOR jar loads a ~60 MB paraphrase table (~5 s) and then answers one line per image; far more than
# this means the subprocess is stuck, and we would rather lose METEOR than hang the evaluation.
METEOR_TIMEOUT_BASE_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.1


@dataclass
class Scores:
    corpus: dict[str, float]                 # metric name -> corpus-level value (BLEU etc. in [0, 1])
    per_image: dict[str, dict[str, float]]   # image id -> metric name -> value
    notes: list[str] = field(default_factory=list)   # e.g. METEOR skipped, fallback tokeniser used


class ScoreTable:
    """Corpus and per-image values, stored metric by metric as pycocoevalcap returns them."""

    def __init__(self, images: Sequence[str]):
        self.images = list(images)
        self.corpus: dict[str, float] = {}
        self.per_image: dict[str, dict[str, float]] = {image: {} for image in self.images}

    def store(self, name: str, score: float, scores: Sequence[float]) -> None:
        self.corpus[name] = float(score)
        for image, value in zip(self.images, scores):
            self.per_image[image][name] = float(value)

    def scores(self, wanted: Sequence[str], notes: list[str]) -> Scores:
        """The stored metrics among `wanted`, in `wanted`'s order."""
        return Scores(corpus={m: self.corpus[m] for m in wanted if m in self.corpus},
                      per_image={image: {m: values[m] for m in wanted if m in values}
                                 for image, values in self.per_image.items()}, notes=notes)


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working `java` is on PATH (cached: the answer does not change within a process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# ----------------------------------------------------------------------------------------------------------
# tokenisation

# Same list as pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS (tokens removed after PTB tokenisation).
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# Characters that some line-oriented reader (Python's splitlines, Stanford's PTBLexer, Java's readLine) treats
# as a line break. One caption must stay one line, or the toolkit silently pairs captions with the wrong images.
_LINE_BREAKS_RE = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SURROGATES_RE = re.compile("[\ud800-\udfff]")   # lone surrogates cannot even be encoded to UTF-8
_NEGATION_RE = re.compile(r"(\w)(n't)\b")
_CLITIC_RE = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
# words may contain inner - . / ' (t-shirt, 3.5, a/b, o'clock); clitics are separate; anything else is a
# one-character token (so "$5" -> "$", "5" and "50%" -> "50", "%", as PTB does).
# PTB keeps the period of single letters and of known abbreviations (a subset of its list, enough for captions)
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "inc", "etc", "vs", "co", "ltd", "mt", "ave",
                  "prof", "gen", "sgt", "capt", "corp", "jan", "feb", "aug", "sept", "oct", "nov", "dec")
_TOKEN_RE = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b"      # clitics
                       r"|\d+(?:[.,:]\d+)+"                # 3.5, 10,000, 3:30
                       r"|(?:[^\W\d_]\.){2,}"                # abbreviations keep their periods: u.s.a., e.g.
                       rf"|(?<!\w)(?:[^\W\d_]|{'|'.join(_ABBREVIATIONS)})\.(?!\w)"   # a. j. mr. etc.
                       r"|(?<!\w)no\.(?=\s*\d)"               # "no. 5", but a final "no." loses its period
                       r"|(?<!\w)'n'(?!\w)"                   # slip 'n' slide
                       r"|-(?:lrb|rrb|lsb|rsb|lcb|rcb)-"      # already-escaped brackets stay whole
                       r"|\w+(?:[-./']\w+)*|\S")
_SPLIT_WORDS_RE = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b")   # PTB: "can not", "gon na"
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})   # PTB normalises these
# PTB escapes brackets; the toolkit's punctuation list has the escapes upper-case, so after -lowerCase they stay
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DROPPED_CHARS = frozenset(".?!,:;-'`\"")


def _one_line(text: str) -> str:
    return _SURROGATES_RE.sub("", _LINE_BREAKS_RE.sub(" ", text))


def simple_tokenize(caption: str) -> str:
    """Pure-python stand-in for PTBTokenizer + coco-caption's punctuation removal; returns space-joined tokens.

    Matches PTB on ordinary captions (identical output on all 35,000 Flickr8K captions): lower-casing,
    "dog's" -> "dog 's", "don't" -> "do n't", "cannot" -> "can not", "$5" -> "$ 5", hyphenated words and
    decimals kept whole, brackets -> "-lrb-" etc. as the toolkit leaves them, . , ; : ! ? quotes and
    dashes dropped. Known differences: PTB decides which periods stay attached ("mr.", "etc.",
    single letters like "a.") with a longer abbreviation list and sentence-end heuristics, we with a short
    fixed list; PTB drops characters outside the BMP (emoji) while we keep them as tokens.
    """
    text = _one_line(caption).lower().translate(_QUOTES)
    text = _CLITIC_RE.sub(r"\1 \2", _NEGATION_RE.sub(r"\1 \2", text))
    text = _SPLIT_WORDS_RE.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN_RE.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS and not set(t) <= _DROPPED_CHARS)


def _ptb_tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """pycocoevalcap's PTBTokenizer on {key: [caption, ...]}, in ONE java call, with its output checked.

    coco-caption tokenises references and predictions in two calls; with -preserveLines every line is
    tokenised on its own, so one call gives the same tokens for one JVM start less (tests check this).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {key: [{"caption": _one_line(c)} for c in caps] for key, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(payload)
    # A caption that still split into several lines, or a JVM that died, shows up as missing/short entries.
    for key, caps in captions.items():
        if len(tokenized.get(key, ())) != len(caps):
            raise RuntimeError("PTBTokenizer output does not line up with its input")
    return tokenized


def _tokenize_all(refs: dict[str, list[str]], preds: dict[str, str], tokenizer: str,
                  notes: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Returns (gts, res) in the toolkit's format: {image: [tokenised caption, ...]} with one caption in res."""
    if tokenizer in ("ptb", "auto"):
        if not java_available():
            notes.append("PTB tokenizer needs Java, which was not found: used the pure-python fallback "
                         "tokenizer (scores may differ slightly from coco-caption's)")
        else:
            combined: dict[object, list[str]] = {("ref", k): v for k, v in refs.items()}
            combined.update({("pred", k): [v] for k, v in preds.items()})
            try:
                tok = _ptb_tokenize(combined)
            except Exception as exc:  # noqa: BLE001 - any failure of the external tool -> fallback, not a crash
                notes.append(f"PTB tokenizer failed ({type(exc).__name__}: {exc}): used the pure-python "
                             "fallback tokenizer (scores may differ slightly from coco-caption's)")
            else:
                return ({k: tok[("ref", k)] for k in refs}, {k: tok[("pred", k)] for k in preds})
    gts = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
    res = {k: [simple_tokenize(v)] for k, v in preds.items()}
    return gts, res


# ----------------------------------------------------------------------------------------------------------
# METEOR subprocess handling


def _meteor_safe(tokenized: str) -> str:
    """METEOR's stdio protocol: one line per request, fields separated by '|||'. Keep each caption one field."""
    text = _one_line(tokenized)
    while "|||" in text:
        text = text.replace("|||", " ")
    return " ".join(text.split())


def _make_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    class ClosableMeteor(Meteor):
        """pycocoevalcap's Meteor (same command, same protocol code) plus explicit, non-blocking cleanup."""

        def __init__(self) -> None:
            super().__init__()   # spawns java -jar meteor-1.5.jar ... -stdio
            # stderr is a PIPE nobody reads: drain it so a chatty JVM can never block on a full pipe.
            stderr = self.meteor_p.stderr
            threading.Thread(target=lambda: [None for _ in iter(lambda: stderr.read(65536), b"")],
                             daemon=True).start()

        def kill(self) -> None:
            if self.meteor_p.poll() is None:
                self.meteor_p.kill()

        def close(self) -> None:
            # The upstream __del__ acquires self.lock; compute_score keeps it held if it raised midway, which
            # would deadlock the garbage collector. Release it, then stop the process ourselves.
            if self.lock.locked():
                self.lock.release()
            proc = self.meteor_p
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - broken pipe on close of a dead process
                    pass
            self.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

        def __del__(self) -> None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    return ClosableMeteor()


# A METEOR process started ahead of time for the next scoring. The jar spends ~5-12 s loading its paraphrase
# table and then scores 1,000 images in ~3 s, so the dashboard starts it (`prestart_meteor`) when it begins
# captioning a split: the table loads while the encoder runs. The next score_captions uses it and closes it,
# as it does a process it started itself.
_warm_meteor = None
_warm_lock = threading.Lock()


def prestart_meteor() -> bool:
    """Start the METEOR subprocess now, in the background (Popen does not wait for the JVM), for the next
    score_captions to use. Returns False without Java. Starts at most one."""
    global _warm_meteor
    if not java_available():
        return False
    with _warm_lock:
        if _warm_meteor is None or _warm_meteor.meteor_p.poll() is not None:
            _warm_meteor = _make_meteor()
    return True


def _take_meteor():
    global _warm_meteor
    with _warm_lock:
        meteor, _warm_meteor = _warm_meteor, None
    if meteor is not None and meteor.meteor_p.poll() is None:
        return meteor
    return _make_meteor()


def _meteor_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    gts = {k: [_meteor_safe(c) for c in v] for k, v in gts.items()}
    res = {k: [_meteor_safe(c) for c in v] for k, v in res.items()}
    meteor = _take_meteor()
    watchdog = threading.Timer(METEOR_TIMEOUT_BASE_S + METEOR_TIMEOUT_PER_IMAGE_S * len(res), meteor.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        # a killed process makes readline() return b"" and float() raise, so a stuck jar ends as an exception
        score, scores = meteor.compute_score(gts, res)
    finally:
        watchdog.cancel()
        meteor.close()
    return float(score), [float(s) for s in scores]


# ----------------------------------------------------------------------------------------------------------
# public API


def _validate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
              metrics: Sequence[str], tokenizer: str) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(METRIC_NAMES)}")
    if not metrics:
        raise ConfigError("no metrics requested")

    def as_str_keys(mapping: Mapping, what: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in mapping.items():
            skey = str(key)
            if skey in out:
                raise DataError(f"{what}: image id {skey!r} appears twice (as {key!r} and as a string)")
            out[skey] = value
        return out

    preds = as_str_keys(predictions, "predictions")
    refs_all = as_str_keys(references, "references")
    if not preds:
        raise DataError("no predictions to score")
    refs: dict[str, list[str]] = {}
    for image, caption in preds.items():
        if not isinstance(caption, str):
            raise DataError(f"prediction for image {image!r} is a {type(caption).__name__}, expected a string")
        image_refs = refs_all.get(image)
        if image_refs is None or isinstance(image_refs, str) or len(image_refs) == 0:
            problem = ("is a single string, expected a list of captions" if isinstance(image_refs, str)
                       else "has no reference captions")
            raise DataError(f"image {image!r} has a prediction but {problem}")
        bad = [r for r in image_refs if not isinstance(r, str)]
        if bad:
            raise DataError(f"references of image {image!r} contain a non-string: {bad[0]!r}")
        refs[image] = list(image_refs)
    ordered = [m for m in METRIC_NAMES if m in metrics]
    return preds, refs, ordered


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   metrics: Sequence[str] = METRIC_NAMES, tokenizer: str = "ptb") -> Scores:
    """Score one predicted caption per image against that image's reference captions.

    Only images in `predictions` are scored (references of other images are ignored, as in COCOEvalCap, and
    they do not enter CIDEr-D's idf). tokenizer: "ptb"/"auto" = coco-caption's PTBTokenizer when Java works,
    else the pure-python fallback with a note; "simple" = always the fallback (fast, no JVM).
    Never fails because of Java: METEOR is skipped with a note instead.
    """
    preds, refs, wanted = _validate(predictions, references, metrics, tokenizer)
    notes: list[str] = []
    unscored = len(set(map(str, references)) - set(preds))
    if unscored:
        notes.append(f"{unscored} image(s) with references but no prediction were not scored")
    gts, res = _tokenize_all(refs, preds, tokenizer, notes)
    images = list(preds)
    table = ScoreTable(images)
    store = table.store

    if any(m in wanted for m in BLEU_NAMES):
        from pycocoevalcap.bleu.bleu import Bleu
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(BLEU_NAMES):
            if name in wanted:
                store(name, score[n], scores[n])
    if "METEOR" in wanted:
        if not java_available():
            notes.append(JAVA_MISSING_NOTE)
        else:
            try:
                store("METEOR", *_meteor_scores(gts, res))
            except Exception as exc:  # noqa: BLE001 - a broken JRE/jar must not take the other metrics down
                notes.append(f"METEOR skipped: the METEOR subprocess failed ({type(exc).__name__}: {exc})")
    if "ROUGE-L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge
        store("ROUGE-L", *Rouge().compute_score(gts, res))
    if "CIDEr-D" in wanted:
        from pycocoevalcap.cider.cider import Cider
        if not any(c.split() for caps in gts.values() for c in caps):
            # the toolkit would crash (max() of an empty idf table); with no reference n-gram it is 0 anyway
            store("CIDEr-D", 0.0, [0.0] * len(images))
            notes.append("CIDEr-D is 0: no reference caption has any word after tokenisation")
        else:
            store("CIDEr-D", *Cider().compute_score(gts, res))
        if len(images) == 1:
            notes.append("CIDEr-D uses idf over the scored images: with a single image it is always 0")
    return table.scores(wanted, notes)


def format_scores(corpus: Mapping[str, float]) -> str:
    """One line for logs/CLIs: BLEU, METEOR, ROUGE-L as percentages (x100, the way papers report them),
    CIDEr-D as is (it is already on a ~0..10 scale, 1.0 = good)."""
    parts = []
    names = [m for m in METRIC_NAMES if m in corpus] + [m for m in corpus if m not in METRIC_NAMES]
    for name in names:
        value = float(corpus[name])
        parts.append(f"{name} {value:.3f}" if name == "CIDEr-D" or name not in METRIC_NAMES
                     else f"{name} {100 * value:.1f}")
    return " | ".join(parts) if parts else "(no scores)"
