"""Caption image files from the command line.

    python -m core.caption photo.jpg other.png                 # bundled checkpoint, its decoding defaults
    python -m core.caption photo.jpg --nbest 3 --json          # n-best with per-token log-probabilities
    python -m core.caption photo.jpg --score "a dog runs on the grass" --json   # teacher-forced score
    python -m core.caption photo.jpg --prefix "a woman in" --json               # continue typed words
    python -m core.caption photo.jpg --beam 4 --num-beam-groups 2 --diversity-penalty 0.5 --nbest 4
    python -m core.caption photo.jpg --sample --top-p 0.9 --bad-words dog --min-length 8

A bad file prints one line naming it and what is wrong; the others are still captioned; the exit code
is 1 if any file failed, 2 for bad arguments or checkpoint. Beam settings not given on the command line
come from the checkpoint (its defaults were tuned on dev), as in the dashboard.
"""
from __future__ import annotations

import argparse
import json
import sys

from core import beam_trace, scoring
from core.captioner import CaptionFailure, Captioner
from core.checkpoint import default_checkpoint_path
from core.decoding import DecodingConfig
from core.cli import add_beam_arguments, add_decoding_knobs, beam_decoding, decoding_knobs
from core.errors import CaptionScopeError, cli_main


def hypothesis_json(captioner: Captioner, result) -> list[dict]:
    return [{"caption": " ".join(words), "logprob": h.logprob, "score": h.score, "length": h.length,
             "finished": h.finished, "token_logprobs": [round(x, 5) for x in h.token_logprobs]}
            for h, words in zip(result.hypotheses, result.words)]


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files (jpg, png, webp, bmp, gif, tiff)")
    parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
    parser.add_argument("--encoder-weights", default=None,
                        help="the encoder's weights: imagenet (default) | none | PATH to a local file")
    add_beam_arguments(parser, nbest_default=1)
    parser.add_argument("--sample", action="store_true", help="sample instead of beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    add_decoding_knobs(parser)
    typed = parser.add_mutually_exclusive_group()
    typed.add_argument("--score", metavar="TEXT", default=None,
                       help="score this caption with teacher forcing (per-word log-probs, attention, beta)")
    typed.add_argument("--prefix", metavar="TEXT", default=None,
                       help="force these first words and let the decoder continue")
    args = parser.parse_args(argv)
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    beam_decoding(args, DecodingConfig(), **sampling, **decoding_knobs(args))   # bad flags exit 2 before loading
    captioner = Captioner.from_checkpoint(args.checkpoint or default_checkpoint_path(),
                                          encoder_weights=args.encoder_weights)
    decoding = beam_decoding(args, captioner.default_decoding(), **sampling, **decoding_knobs(args))
    captioner.check_decoding(decoding)      # bad words outside the vocabulary: one error, not one per image
    if args.score is not None or args.prefix is not None:
        return _typed_caption(captioner, args, decoding)
    failed = 0
    for path, result in zip(args.images, captioner.caption_many(args.images, decoding, names=args.images)):
        if isinstance(result, CaptionFailure):
            failed += 1
            if args.json:
                print(json.dumps({"image": path, "error": result.error}))
            else:
                print(f"error: {result.error}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": path, "caption": result.caption,
                              "hypotheses": hypothesis_json(captioner, result),
                              "encode_ms": round(result.encode_ms, 1), "decode_ms": round(result.decode_ms, 1)}))
        elif args.nbest > 1:
            print(path)
            for h, words in zip(result.hypotheses, result.words):
                print(f"  {h.score:8.3f}  {' '.join(words)}")
        else:
            print(f"{path}\t{result.caption}")
    return 1 if failed else 0


def _typed_caption(captioner: Captioner, args: argparse.Namespace, decoding: DecodingConfig) -> int:
    """--score / --prefix: the text is checked once (a bad one exits 2), then each image is handled."""
    text = args.score if args.score is not None else args.prefix
    prepared = scoring.prepare_caption(text, captioner.vocab, allow_oov=args.score is not None,
                                       what="caption" if args.score is not None else "prefix")
    failed = 0
    for path in args.images:
        try:
            feats = captioner.features(path, name=path)[0]
            best = captioner.decode(feats.unsqueeze(0), decoding)[0][0]
            if args.score is not None:
                out = _score_json(captioner, feats, text, best, decoding)
            else:
                hyps = beam_trace.continue_caption(captioner.model, feats, decoding, prepared.token_ids,
                                                    vocab=captioner.vocab)
                words = [captioner.words(h) for h in hyps]
                out = {"prefix": " ".join(prepared.words), "caption": " ".join(words[0]),
                       "hypotheses": [{"caption": " ".join(w), "logprob": h.logprob, "score": h.score,
                                       "length": h.length, "finished": h.finished,
                                       "token_logprobs": [round(x, 5) for x in h.token_logprobs],
                                       "attention": [[round(float(a), 5) for a in row] for row in h.attention]}
                                      for h, w in zip(hyps, words)]}
        except CaptionScopeError as e:
            failed += 1
            print(json.dumps({"image": path, "error": str(e)}) if args.json else f"error: {e}",
                  file=sys.stdout if args.json else sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": path, **out}))
        elif args.score is not None:
            print(f"{path}\tlogprob {out['logprob']:.3f}\t" + " ".join(
                f"{w}({p:.2f})" for w, p in zip(out["words"], out["token_logprobs"])))
        else:
            print(f"{path}\t{out['caption']}")
    return 1 if failed else 0


def _score_json(captioner: Captioner, feats, text: str, best, decoding: DecodingConfig) -> dict:
    scored = scoring.score_caption(captioner, feats, text, decoding)
    return {"caption": " ".join(scored.words[:-1]), **scored.to_json(),
            "best": {"caption": " ".join(captioner.words(best)), "logprob": best.logprob,
                     "per_token": best.logprob / max(best.length, 1)}}


if __name__ == "__main__":
    sys.exit(main())
