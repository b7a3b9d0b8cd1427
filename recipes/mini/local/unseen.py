"""A manifest of a corpus's items that the bundled ``data/`` slice does not hold: speech no mini run trained,
validated, tested or tuned on, to check a finished model on more than the 12 test utterances.

    python recipes/mini/local/unseen.py --corpus ../shared/corpora/espeak --bundled data/espeak --language en \
      --output recipes/mini/exp/data/en_unseen.jsonl

The corpus (``../shared/corpora``, outside the repository) is read in place: the manifest written names its audio
by absolute path. Items are kept in id order; ``--max-items`` keeps the first N of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speechlab.data.manifest import read_manifest, write_manifest


def unseen_items(
    corpus: Path, bundled: Path, language: str | None = None, max_items: int | None = None
) -> list[dict]:
    """Items of ``corpus/manifest.jsonl`` whose id is not in ``bundled/manifest.jsonl``, optionally one language."""
    held = {item["id"] for item in read_manifest(bundled / "manifest.jsonl", check_audio="none")}
    items = read_manifest(corpus / "manifest.jsonl", where=lambda it: language in (None, it.get("language")))
    kept = sorted((it for it in items if it["id"] not in held), key=lambda it: it["id"])
    return kept[:max_items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus folder with manifest.jsonl")
    parser.add_argument("--bundled", type=Path, required=True, help="its slice in data/ (manifest.jsonl)")
    parser.add_argument("--language", help="keep only this language (the manifest's 'language' field)")
    parser.add_argument("--max-items", type=int, help="keep the first N unseen items (id order)")
    parser.add_argument("--output", type=Path, required=True, help="the manifest to write")
    args = parser.parse_args()
    items = unseen_items(args.corpus, args.bundled, args.language, args.max_items)
    if not items:
        parser.error(f"{args.corpus} has no item that {args.bundled} does not hold")
    write_manifest(args.output, items)
    print(f"{len(items)} unseen items ({sum(it['duration'] for it in items) / 60:.1f} min) -> {args.output}")


if __name__ == "__main__":
    main()
