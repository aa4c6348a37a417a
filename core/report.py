"""A self-contained HTML report of captions and their attention, for people who do not run the app.

    python -m core.report photo.jpg other.png --out report.html
    python -m core.report --data ../shared/flickr8k --split dev --images 1000268201_693b08cb0e.jpg --out report.html

One file: every image is embedded as a data: URI, the style sheet is inline, there is no script, and a
Content-Security-Policy forbids any request (images only from data:), so it opens offline and shows the
same everywhere. Each image gets its caption and n-best list, a strip of per-word attention heatmaps, for a
Flickr8K image its references and per-image scores, and the report states the checkpoint, its sha256 and
the decoding settings. Every caption, reference and file name is HTML-escaped: a file named
`<img src=x onerror=alert(1)>.jpg` shows as that text.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from core import analysis
from core.captioner import CaptionFailure, CaptionResult
from core.decoding import DecodingConfig
from core.cli import add_beam_arguments, beam_decoding
from core.errors import CaptionScopeError, DataError, cli_main
from core.images import fit_for_display
from core.io_utils import atomic_write_text, printable_name
from core.text import END

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#1f2937;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin:0 0 .3rem;word-break:break-all}
.meta{color:#4b5563;font-size:.9rem}.meta code{word-break:break-all}
section{border-top:1px solid #e5e7eb;padding:1.5rem 0}
.row{display:flex;gap:1.5rem;flex-wrap:wrap}.row>div{flex:1 1 320px}
.main{max-width:100%;height:auto;border-radius:4px}
.caption{font-size:1.3rem;font-weight:600;margin:.2rem 0 .8rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}td,th{border-bottom:1px solid #e5e7eb;
padding:.25rem .5rem;text-align:left}
.strip{display:flex;flex-wrap:wrap;gap:.4rem;padding:.5rem 0}.strip figure{margin:0;text-align:center;
flex:0 0 auto}.strip img{display:block;border-radius:3px}.strip figcaption{font-size:.85rem}
.error{color:#b91c1c}ol{margin:.3rem 0;padding-left:1.4rem}
"""


@dataclass(frozen=True)
class ReportConfig:
    """How big things are drawn (bounded, so a report of many images stays a few MB)."""
    image_side: int = 480          # long side of the main picture
    strip_side: int = 112          # long side of each per-word heatmap
    max_words: int = 30            # heatmaps per image at most
    jpeg_quality: int = 82
    opacity: float = 0.5
    cmap: str = "jet"


@dataclass
class ReportEntry:
    """One image of the report: its caption result (or failure), and for a Flickr8K image its references
    and per-image scores (metric -> value in [0, 1] as core.metrics gives them)."""
    name: str
    result: CaptionResult | CaptionFailure
    origin: str = "file"                   # file | upload | example | flickr8k
    references: Sequence[str] = ()
    scores: Mapping[str, float] = field(default_factory=dict)


def _jpeg_uri(image: Image.Image, side: int, quality: int) -> str:
    image = fit_for_display(image.convert("RGB"))        # bounded size and shape (extreme strips letterboxed)
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tokens(result: CaptionResult) -> list[str]:
    hyp = result.hypotheses[0]
    return list(result.words[0]) + ([END] if hyp.finished else [])


def _strip(result: CaptionResult, grid: int, config: ReportConfig) -> str:
    small = fit_for_display(result.image.convert("RGB"), config.strip_side)
    attention = result.hypotheses[0].attention
    figures = []
    for t, word in enumerate(_tokens(result)[: min(config.max_words, len(attention))]):
        heat = analysis.upsample_attention(attention[t], grid, small.size)
        overlay = analysis.overlay_heatmap(small, heat, opacity=config.opacity, cmap=config.cmap)
        figures.append(f'<figure><img src="{_jpeg_uri(overlay, config.strip_side, config.jpeg_quality)}" '
                       f'width="{overlay.width}" height="{overlay.height}" alt="attention for word {t + 1}">'
                       f"<figcaption>{t + 1}. {html.escape(word)}</figcaption></figure>")
    return '<div class="strip">' + "".join(figures) + "</div>"


def _nbest(result: CaptionResult) -> str:
    rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(' '.join(words))}</td><td>{h.logprob:.2f}</td>"
                   f"<td>{h.logprob / max(h.length, 1):.3f}</td></tr>"
                   for i, (h, words) in enumerate(zip(result.hypotheses, result.words)))
    return ("<table><thead><tr><th>#</th><th>Caption</th><th>Log-prob</th><th>Per token</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _flickr(entry: ReportEntry) -> str:
    parts = []
    if entry.references:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in entry.references)
        parts.append(f"<h3>References</h3><ol>{refs}</ol>")
    if entry.scores:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{float(v) * 100:.1f}</td></tr>"
                        for k, v in entry.scores.items())
        parts.append(f"<h3>Scores (×100)</h3><table><tbody>{cells}</tbody></table>")
    return "".join(parts)


def _section(entry: ReportEntry, grid: int, config: ReportConfig) -> str:
    name = html.escape(printable_name(entry.name))
    if isinstance(entry.result, CaptionFailure):
        return f'<section><h2>{name}</h2><p class="error">{html.escape(entry.result.error)}</p></section>'
    result = entry.result
    if not result.hypotheses or result.image is None:
        return f'<section><h2>{name}</h2><p class="error">no caption for this image</p></section>'
    main = _jpeg_uri(result.image, config.image_side, config.jpeg_quality)
    return (f'<section><h2>{name}</h2><p class="meta">{html.escape(entry.origin)}</p><div class="row">'
            f'<div><img class="main" src="{main}" alt="{name}"></div>'
            f'<div><p class="caption">{html.escape(result.caption) or "(empty caption)"}</p>{_nbest(result)}'
            f"{_flickr(entry)}</div></div><h3>Attention of each word</h3>{_strip(result, grid, config)}</section>")


def build_report(entries: Sequence[ReportEntry], *, checkpoint_name: str, checkpoint_sha256: str,
                 decoding: DecodingConfig, grid: int, title: str = "CaptionScope report",
                 notes: Sequence[str] = (), config: ReportConfig = ReportConfig()) -> str:
    """The whole report as one HTML string (no external resource of any kind)."""
    settings = ", ".join(f"{k}={v}" for k, v in decoding.to_dict().items())
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note_html = "".join(f"<p class=\"meta\">{html.escape(n)}</p>" for n in notes)
    body = "".join(_section(e, grid, config) for e in entries)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f'<p class="meta">Checkpoint <strong>{html.escape(checkpoint_name)}</strong> · sha256 '
            f"<code>{html.escape(checkpoint_sha256)}</code></p>"
            f'<p class="meta">Decoding: {html.escape(settings)}</p>'
            f'<p class="meta">{len(entries)} image{"s" if len(entries) != 1 else ""} · made {created} by '
            f"CaptionScope</p>{note_html}{body}</body></html>")


def report_for_captioner(captioner, entries: Sequence[ReportEntry], decoding: DecodingConfig, **kw) -> str:
    name = captioner.path.name if captioner.path else "(in memory)"
    return build_report(entries, checkpoint_name=name, checkpoint_sha256=captioner.checkpoint_id,
                        decoding=decoding, grid=captioner.grid, **kw)


def flickr_entries(captioner, items, decoding: DecodingConfig, *, with_meteor: bool = True) -> tuple[list[ReportEntry], list[str]]:
    """Caption dataset items from their files and score them among themselves; returns entries + notes."""
    from core.metrics import java_available, score_captions

    results = captioner.caption_many([it.path for it in items], decoding, names=[it.image for it in items])
    ok = {it.image: r.caption for it, r in zip(items, results) if isinstance(r, CaptionResult)}
    notes: list[str] = []
    per_image: dict = {}
    if ok:
        wanted = [m for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
                  if m != "METEOR" or (with_meteor and java_available())]
        scores = score_captions(ok, {it.image: list(it.captions) for it in items if it.image in ok}, metrics=wanted)
        per_image = scores.per_image
        notes += scores.notes
        notes.append(f"Scores of each image against its references; CIDEr-D's idf comes from the {len(ok)} "
                     "image(s) of this report, so it is only comparable within the report.")
    entries = [ReportEntry(it.image, r, "flickr8k", list(it.captions), per_image.get(it.image, {}))
               for it, r in zip(items, results)]
    return entries, notes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.report", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="*", help="image files (jpg, png, webp, bmp, gif, tiff)")
    p.add_argument("--data", default=None, help="Flickr8K folder, with --images NAME...")
    p.add_argument("--split", default="dev")
    p.add_argument("--images", dest="names", nargs="+", default=None, metavar="NAME",
                   help="Flickr8K image file names of --split (with --data)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
    p.add_argument("--encoder-weights", default=None, help="imagenet (default) | none | PATH")
    add_beam_arguments(p, nbest_default=3)      # defaults: the checkpoint's decoding settings
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM takes ~5-12 s to start)")
    p.add_argument("--title", default="CaptionScope report")
    return p


def _dataset_items(data: str, split: str, names: Sequence[str]):
    from core.data import load_dataset

    items = {it.image: it for it in load_dataset(data).split(split)}
    unknown = [n for n in names if n not in items]
    if unknown:
        raise DataError(f"not in the {split} split of {data}: {', '.join(unknown[:5])}"
                        + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    return [items[n] for n in names]


@cli_main
def main(argv: list[str] | None = None) -> int:
    from core.captioner import Captioner
    from core.checkpoint import default_checkpoint_path

    args = _parser().parse_args(argv)
    if bool(args.data) != bool(args.names):
        raise CaptionScopeError("--data and --images NAME... go together")
    if not args.images and not args.names:
        raise CaptionScopeError("give image files, or --data D --split dev --images NAME...")
    beam_decoding(args, DecodingConfig(), nbest_within_beam=True)     # bad flags exit 2 before loading
    items = _dataset_items(args.data, args.split, args.names) if args.names else []
    if items and not args.no_meteor:
        from core.metrics import prestart_meteor
        prestart_meteor()          # the METEOR JVM loads its tables while the images are captioned
    captioner = Captioner.from_checkpoint(args.checkpoint or default_checkpoint_path(),
                                          encoder_weights=args.encoder_weights)
    decoding = beam_decoding(args, captioner.default_decoding(), nbest_within_beam=True)
    entries, notes = (flickr_entries(captioner, items, decoding, with_meteor=not args.no_meteor) if items
                      else ([], []))
    if args.images:
        results = captioner.caption_many(args.images, decoding, names=[Path(p).name for p in args.images])
        entries += [ReportEntry(r.name, r, "file") for r in results]
    atomic_write_text(Path(args.out), report_for_captioner(captioner, entries, decoding, title=args.title,
                                                           notes=notes))
    failed = [e for e in entries if isinstance(e.result, CaptionFailure)]
    for e in failed:
        print(f"error: {e.result.error}", file=sys.stderr)
    print(f"wrote {args.out} ({len(entries) - len(failed)} of {len(entries)} images captioned)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
