"""Caption image files from the command line.

    python -m core.caption photo.jpg other.png                 # bundled checkpoint, beam 5
    python -m core.caption photo.jpg --nbest 3 --json          # n-best with per-token log-probabilities

A bad file prints one line naming it and what is wrong; the others are still captioned; the exit code
is 1 if any file failed, 2 for bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys

from core.captioner import CaptionFailure, Captioner
from core.checkpoint import default_checkpoint_path
from core.decoding import DecodingConfig
from core.errors import cli_main


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
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--nbest", type=int, default=1, help="print this many hypotheses per image")
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--no-repeat-ngram", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="sample instead of beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    decoding = DecodingConfig(beam_size=args.beam, num_return_sequences=args.nbest,
                              length_penalty=args.length_penalty, max_length=args.max_length,
                              no_repeat_ngram_size=args.no_repeat_ngram, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    captioner = Captioner.from_checkpoint(args.checkpoint or default_checkpoint_path(),
                                          encoder_weights=args.encoder_weights)
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


if __name__ == "__main__":
    sys.exit(main())
