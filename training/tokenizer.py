"""Train the caption tokenizer: `python -m training.tokenizer --captions FILES... --out tokenizer.json`.

The tokenizer is trained once, offline, before the model; the model's vocab_size is then taken
from it and the file is copied into every checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from backend.files import file_in_the_way
from backend.model.checkpoint import WEIGHTS
from backend.model.tokenizer import TokenizerError, train_tokenizer
from training.data import caption_field, caption_list, karpathy_sentence

EPILOG = """\
caption files:
  plain text, one caption a line (e.g. ../shared/data/captions/rsicd_train_caps.txt), or
  JSONL manifests (.jsonl, or .json) whose objects carry "captions" (a list) or "caption" (a
  string) (e.g. ../shared/data/ucm/captions.jsonl), or Karpathy split files (dataset_*.json).
  Blank lines are skipped.

example:
  python -m training.tokenizer \\
      --captions ../shared/data/captions/*_train_caps.txt ../shared/data/ucm/captions.jsonl \\
      --extra-words "storage tanks" "railway station" classes.txt \\
      --vocab-size 8192 --out tokenizer.json
"""



def read_caption_texts(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[str]:
    """Captions from text files (one a line) and JSONL manifests, blank lines skipped.

    A file ending in .jsonl / .ndjson holds one JSON object a line, whose `captions` (a list of
    strings) or else `caption` (a string) are read, as training reads a manifest; objects with neither (unlabelled images) are
    skipped. A .json file is read the same way, unless it is one JSON document: a Karpathy split
    file (`{"images": [{"sentences": [{"raw": ...}]}]}`) or a list of such objects. Any other file
    is plain text, one caption a line (e.g. RSICD's *_caps.txt).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in map(Path, paths):
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a directory; pass caption files (e.g. {path}/*_caps.txt)")
        # utf-8-sig: tolerate a byte-order mark from files saved on Windows
        with path.open(encoding="utf-8-sig") as f:
            try:
                if path.suffix.lower() == ".json":
                    yield from _json_captions(f.read(), path)
                elif path.suffix.lower() in (".jsonl", ".ndjson"):
                    yield from _manifest_captions(f, path)
                else:
                    for line in f:
                        line = line.strip()
                        if line:
                            yield line
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason}); is it a caption file?") from None


def _json_captions(text: str, path: Path) -> Iterator[str]:
    """A .json file: one document (Karpathy split file, or a list of manifest objects), else JSONL."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        yield from _manifest_captions(text.splitlines(), path)   # one object a line
        return
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        for image in document["images"]:
            for sentence in image.get("sentences", []) if isinstance(image, dict) else []:
                raw = karpathy_sentence(sentence) if isinstance(sentence, dict) else None
                if isinstance(raw, str) and raw.strip():
                    yield raw.strip()
    elif isinstance(document, list):
        for i, record in enumerate(document, 1):
            yield from _record_captions(record, f"{path}[{i}]")
    else:
        yield from _manifest_captions(text.splitlines(), path)


def _manifest_captions(lines: Iterable[str], path: Path) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        yield from _record_captions(record, f"{path}:{lineno}")


def _record_captions(record, where: str) -> Iterator[str]:
    """The captions of one manifest object, read as training reads them (data.caption_field)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        yield from caption_list(caption_field(record))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.tokenizer",
        description="Train SkyPrompt's byte-level BPE caption tokenizer and write it as tokenizer.json. "
        "Text is NFKC-normalised and lowercased; any text encodes (no unknown tokens).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--captions", nargs="+", required=True, metavar="PATH",
                   help="caption files to train on (plain text or .jsonl manifests)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="where to write tokenizer.json (a directory means DIR/tokenizer.json)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="largest vocabulary to learn, special and byte tokens included (default: %(default)s); "
                        "the model's vocab_size must be at least the size reported")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="merge only pairs seen at least N times (default: %(default)s)")
    p.add_argument("--extra-words", nargs="+", default=[], metavar="FILE_OR_WORDS",
                   help="words users will type that the captions may lack, such as class names: each "
                        "argument is a file (one word or phrase a line) or the phrase itself "
                        "(quote multi-word phrases: \"storage tanks\")")
    p.add_argument("--extra-repeat", type=int, default=10, metavar="N",
                   help="add each extra word to the corpus N times, so that BPE learns it as whole "
                        "tokens rather than leaving it as rare fragments (default: %(default)s)")
    p.add_argument("--context-length", type=int, default=64, metavar="N",
                   help="only for the summary: how many captions would be cut at this model "
                        "context length, <bos> and <eos> included (default: %(default)s)")
    return p


def looks_like_a_path(arg: str) -> bool:
    """An --extra-words argument meant as a file (a folder in it, or a file extension), not a phrase."""
    return "/" in arg or os.sep in arg or bool(re.search(r"\.(txt|json|jsonl|csv|tsv)$", arg.strip(), re.I))


def read_extra_words(args: list[str]) -> list[str]:
    """Each argument is a file of words/phrases (one a line) or a phrase itself."""
    words = []
    for arg in args:
        if Path(arg).is_file():
            words.extend(read_caption_texts(arg))
        elif arg.strip():
            words.append(arg.strip())
    return words


def _is_tokenizer_file(path: Path) -> bool:
    """Whether `path` holds a tokenizer (one an earlier run wrote, which a new run may replace)."""
    try:
        if path.stat().st_size > 256 << 20:        # far larger than any tokenizer
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model" in data


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in map(Path, args.captions):
        if not path.exists():
            parser.error(f"captions file {path} does not exist")
        if path.is_dir():
            parser.error(f"{path} is a directory; pass the caption files in it (e.g. {path}/*_train_caps.txt)")
    for arg in args.extra_words:
        if not Path(arg).is_file() and looks_like_a_path(arg):
            # else it would become a phrase of the vocabulary, unsaid
            parser.error(f"--extra-words {arg}: no such file (a phrase is words, not a path): give a file that "
                         "exists, or the words themselves")
    out = Path(args.out)
    # a folder, or one to be made when the name ends with a slash ("runs/tok/")
    target = out / "tokenizer.json" if out.is_dir() or args.out.endswith(("/", os.sep)) else out
    if (target.parent / WEIGHTS).is_file():
        parser.error(f"--out {args.out} is in a checkpoint folder: writing there would replace the tokenizer its "
                     "model was trained with; write the new tokenizer elsewhere")
    blocking = file_in_the_way(target.parent)
    if blocking is not None:
        parser.error(f"--out {args.out}: {blocking} is a file, not a folder")
    inputs = [Path(p) for p in [*args.captions, *args.extra_words] if Path(p).is_file()]
    if target.is_file() and any(target.samefile(p) for p in inputs):
        parser.error(f"--out {args.out} is one of the input files: it would be replaced by the tokenizer; "
                     "give another --out")
    if target.is_file() and not _is_tokenizer_file(target):
        parser.error(f"--out {args.out} exists and is not a tokenizer file: give a new path (or delete it first)")
    if args.vocab_size < 1 or args.min_frequency < 1 or args.extra_repeat < 0 or args.context_length < 2:
        parser.error("--vocab-size and --min-frequency must be positive, --extra-repeat non-negative, "
                     "--context-length at least 2")

    try:
        texts = list(read_caption_texts(args.captions))
        extra = read_extra_words(args.extra_words)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if not texts:
        parser.error(f"no caption text in {', '.join(args.captions)} (empty files, or manifests without "
                     f"\"captions\"/\"caption\")")

    start = time.perf_counter()
    try:
        tok = train_tokenizer(texts + extra * args.extra_repeat, args.vocab_size, args.min_frequency)
    except TokenizerError as e:
        parser.error(str(e))
    seconds = time.perf_counter() - start
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = tok.save(target)
    except OSError as e:
        print(f"training.tokenizer: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2

    lengths = [len(ids) for ids in (tok.encode(t) for t in texts)]
    cut = sum(n + 2 > args.context_length for n in lengths)
    example = texts[0]
    ids = tok.encode(example)
    print(f"trained on {len(texts)} captions from {len(args.captions)} file(s)"
          + (f" + {len(extra)} extra words x{args.extra_repeat}" if extra else "")
          + f" in {seconds:.1f}s")
    print(f"vocab size: {tok.vocab_size} (asked for {args.vocab_size})")
    print(f"tokens per caption: mean {statistics.fmean(lengths):.2f}, max {max(lengths)} (without <bos>/<eos>); "
          f"{cut} caption(s) longer than context length {args.context_length}")
    print(f"example: {example!r}")
    print(f"  tokens: {tok.tokens(example)}")
    print(f"  ids:    {ids}")
    print(f"  decode: {tok.decode(ids)!r}")
    for word in extra[:5]:
        print(f"  extra {word!r} -> {tok.tokens(word)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
