"""Rebuild the bundled ``data/`` slice from ``../shared/corpora`` (deterministic).

Usage: python data/make_bundle.py [--corpora ../shared/corpora]
"""

import argparse
import json
import random
import shutil
from pathlib import Path

# set -> {language: count}; None = every language present.
SLICES = {
    "ljspeech_en": {"en": 50},
    "espeak": {"en": 120, "sw": 40, "tr": 40, "cy": 40},
    "noise_opensfx": {None: 12},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora")
    args = parser.parse_args()
    out_root = Path(__file__).resolve().parent
    for name, counts in SLICES.items():
        src = args.corpora / name
        items = [json.loads(line) for line in (src / "manifest.jsonl").open(encoding="utf-8")]
        rng = random.Random(0)
        chosen = []
        for language, count in counts.items():
            pool = [it for it in items if language is None or it["language"] == language]
            chosen += sorted(rng.sample(pool, count), key=lambda it: it["id"])
        dst = out_root / name
        if dst.exists():
            shutil.rmtree(dst)
        for item in chosen:
            (dst / item["audio"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / item["audio"], dst / item["audio"])
        with (dst / "manifest.jsonl").open("w", encoding="utf-8") as f:
            for item in chosen:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        shutil.copyfile(src / "SOURCE.md", dst / "SOURCE.md")
        print(f"{name}: {len(chosen)} items, {sum(it['duration'] for it in chosen) / 60:.1f} min")


if __name__ == "__main__":
    main()
