"""Stage 0 of the mini recipe: split the bundled ``data/`` corpora into train / val / test manifests.

Splits are deterministic (sorted ids, every k-th utterance held out) so every run of the recipe sees the same data.
Output (``--out``, default ``recipes/mini/exp/data``):

| manifest | content |
|---|---|
| ``en_train/val/test.jsonl`` | espeak English with ``phonemes`` (the labeled, high-resource language) |
| ``lowres_<lang>_train/test.jsonl`` | espeak Swahili / Turkish / Welsh (the low-resource languages) |
| ``lj_train/val/test.jsonl`` | LJ Speech English (real speech with transcripts) |
| ``pretrain_train/val.jsonl`` | everything with speech, for self-supervised pretraining and the codec |
| ``unispeech_train.jsonl`` | espeak English (labeled) + the low-resource train splits (unlabeled in pretraining) |
| ``noise.jsonl`` | real noise clips for WavLM utterance mixing |
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speechlab.data.manifest import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def split(items: list[dict], every: int, offset: int = 0) -> tuple[list[dict], list[dict]]:
    """(kept, held out): every ``every``-th item (from ``offset``) in id order is held out."""
    items = sorted(items, key=lambda it: it["id"])
    held = [it for i, it in enumerate(items) if i % every == offset]
    kept = [it for i, it in enumerate(items) if i % every != offset]
    return kept, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="folder with the bundled corpora")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "mini" / "exp" / "data")
    args = parser.parse_args()

    espeak = read_manifest(args.data / "espeak" / "manifest.jsonl", require=("text", "phonemes"))
    lj = read_manifest(args.data / "ljspeech_en" / "manifest.jsonl", require=("text",))
    noise = read_manifest(args.data / "noise_opensfx" / "manifest.jsonl")

    outputs: dict[str, list[dict]] = {}
    en = [it for it in espeak if it["language"] == "en"]
    en_rest, outputs["en_test"] = split(en, 10, 0)
    outputs["en_train"], outputs["en_val"] = split(en_rest, 10, 0)
    for lang in ("sw", "tr", "cy"):
        outputs[f"lowres_{lang}_train"], outputs[f"lowres_{lang}_test"] = split(
            [it for it in espeak if it["language"] == lang], 4, 0
        )
    lj_rest, outputs["lj_test"] = split(lj, 10, 0)
    outputs["lj_train"], outputs["lj_val"] = split(lj_rest, 9, 0)
    outputs["pretrain_train"] = (
        outputs["en_train"]
        + outputs["lj_train"]
        + [it for k, v in outputs.items() if k.endswith("_train") and "lowres" in k for it in v]
    )
    outputs["pretrain_val"] = outputs["en_val"] + outputs["lj_val"]
    outputs["unispeech_train"] = outputs["en_train"] + [
        it for lang in ("sw", "tr", "cy") for it in outputs[f"lowres_{lang}_train"]
    ]
    outputs["noise"] = noise

    for name, items in outputs.items():
        write_manifest(args.out / f"{name}.jsonl", items)
        minutes = sum(it["duration"] for it in items) / 60
        print(f"{name:>20}: {len(items):4d} utterances, {minutes:5.1f} min")


if __name__ == "__main__":
    main()
