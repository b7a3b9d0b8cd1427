#!/usr/bin/env python
"""UniSpeech low-resource experiment on the bundled espeak corpus (a CPU-sized replica of the paper's setting).

English (labeled, "high resource") plus Swahili / Turkish / Welsh ("low resource"; 30 train / 10 held-out
utterances each, the split of ``recipes/mini/prepare.py``: sorted ids, every 4th held out). Rows, each with the same
step budget per row:

    (a) CTC from scratch on the low-resource train split                         (fine-tune steps only)
    (b) contrastive-only pretraining (wav2vec 2.0, α = 0) then CTC fine-tuning
    (c) multitask pretraining, swap 0 (α = 0.5: English CTC + contrastive) then fine-tuning
    (d) UniSpeech pretraining, swap 0.5 then fine-tuning

Pretraining (b-d) sees English train (labeled; CTC only for c/d) + the three low-resource train splits (unlabeled),
in length-bucketed mixed batches. Fine-tuning trains ``CTCModel`` (the encoder + a fresh linear phone head) on one
low-resource language, with the CNN frozen for pretrained encoders (paper protocol) and trainable from scratch in
(a). Metric: greedy-CTC phone error rate on the language's held-out split (each utterance alone, no padding).

Writes ``<out>/results.md`` (the markdown table) and ``<out>/results.json`` (every number), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from speechlab.audio import load_audio  # noqa: E402
from speechlab.data.collate import collate  # noqa: E402
from speechlab.data.text import PhonemeTokenizer  # noqa: E402
from speechlab.models.ctc import CTCModel, ctc_greedy_decode  # noqa: E402
from speechlab.nn.masking import span_mask  # noqa: E402
from speechlab.optim import OptimConfig, build_optimizer  # noqa: E402
from speechlab.tasks.ctc import error_counts  # noqa: E402
from speechlab.tasks.unispeech import UniSpeechTask  # noqa: E402

LOW_RESOURCE = ("sw", "tr", "cy")
ROWS = {
    "a": "(a) CTC from scratch",
    "b": "(b) contrastive-only pretrain → FT",
    "c": "(c) multitask, swap 0 → FT",
    "d": "(d) UniSpeech, swap 0.5 → FT",
}
PRETRAIN = {"b": {"ctc_weight": 0.0, "swap_prob": 0.0}, "c": {"ctc_weight": 0.5, "swap_prob": 0.0}}
PRETRAIN["d"] = {"ctc_weight": 0.5, "swap_prob": 0.5}


# ----------------------------------------------------------------------------------------------------------- data
def load_corpus(manifest: Path, max_seconds: float) -> tuple[dict[str, list[dict]], PhonemeTokenizer]:
    """Splits of the espeak corpus with audio in memory (utterances longer than ``max_seconds`` are dropped)."""
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = PhonemeTokenizer.build([r["phonemes"] for r in rows])
    rows = [r for r in rows if r["duration"] <= max_seconds]
    for r in rows:
        r["waveform"] = load_audio(manifest.parent / r["audio"])
        r["targets"] = tokenizer.encode(r["phonemes"])
    splits: dict[str, list[dict]] = {}
    en = sorted((r for r in rows if r["language"] == "en"), key=lambda r: r["id"])
    splits["en_train"] = [r for i, r in enumerate(en) if i % 10 != 0]
    for lang in LOW_RESOURCE:
        items = sorted((r for r in rows if r["language"] == lang), key=lambda r: r["id"])
        splits[f"{lang}_train"] = [r for i, r in enumerate(items) if i % 4 != 0]
        splits[f"{lang}_test"] = [r for i, r in enumerate(items) if i % 4 == 0]
    return splits, tokenizer


def make_batch(items: list[dict]):
    return collate(
        [
            {"id": r["id"], "audio": r["waveform"], "targets": r["targets"], "language": r["language"]}
            for r in items
        ]
    )


class Buckets:
    """Length-sorted batches of ``batch_size``; each step draws one at random (little padding, random order)."""

    def __init__(self, items: list[dict], batch_size: int, rng: random.Random):
        self.items = sorted(items, key=lambda r: r["duration"])
        self.batch_size, self.rng = batch_size, rng

    def sample(self):
        start = self.rng.randrange(0, max(1, len(self.items) - self.batch_size + 1))
        return make_batch(self.items[start : start + self.batch_size])


def optimizer_for(parameters, lr: float, steps: int, warmup: int):
    config = OptimConfig(lr=lr, warmup_steps=warmup, decay="linear", total_steps=steps, weight_decay=0.01)
    built = build_optimizer(parameters, config, total_steps=steps)
    return built["optimizer"], built["lr_scheduler"]["scheduler"]


# ------------------------------------------------------------------------------------------------------- training
def pretrain(row: str, splits, tokenizer, args, seed: int) -> tuple[dict, dict]:
    """Train UniSpeechTask for ``args.pretrain_steps``; returns (encoder state dict, final loss parts)."""
    torch.manual_seed(seed)
    cpu_start = time.process_time()
    settings = PRETRAIN[row]
    task = UniSpeechTask(
        model="unispeech_tiny",
        model_overrides={"swap_prob": settings["swap_prob"]},
        num_ctc_classes=tokenizer.vocab_size,
        ctc_weight=settings["ctc_weight"],
        num_negatives=args.num_negatives,
        labeled_languages=["en"],
    ).train()
    pool = splits["en_train"] + [r for lang in LOW_RESOURCE for r in splits[f"{lang}_train"]]
    buckets = Buckets(pool, args.batch_size, random.Random(seed))
    optimizer, scheduler = optimizer_for(
        task.named_parameters(), args.pretrain_lr, args.pretrain_steps, args.warmup
    )
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in tqdm(
        range(args.pretrain_steps), desc=f"seed {seed} pretrain {row}", leave=False, disable=args.quiet
    ):
        task.model.set_step(step)
        parts = task.compute_losses(buckets.sample(), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        history.append({k: float(v.detach()) for k, v in parts.items() if not k.startswith("_")})
    tail = history[-20:]
    summary = {k: statistics.fmean(h[k] for h in tail) for k in tail[0]}
    summary["cpu_seconds"] = time.process_time() - cpu_start
    return {k: v.detach().clone() for k, v in task.model.encoder.state_dict().items()}, summary


def finetune_and_score(encoder_state, lang: str, splits, tokenizer, args, seed: int, encoder_config) -> float:
    """CTC fine-tuning on ``lang``'s train split; returns PER (%) on its held-out split."""
    torch.manual_seed(seed + 1000)
    model = CTCModel(encoder_config, tokenizer.vocab_size, head_dropout=0.1)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
        model.encoder.feature_encoder.requires_grad_(False)  # paper: feature_grad_mult 0 in fine-tuning
    model.train()
    buckets = Buckets(splits[f"{lang}_train"], args.batch_size, random.Random(seed + 7))
    optimizer, scheduler = optimizer_for(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        args.finetune_lr,
        args.finetune_steps,
        args.warmup,
    )
    generator = torch.Generator().manual_seed(seed + 11)
    for _ in tqdm(range(args.finetune_steps), desc=f"seed {seed} FT {lang}", leave=False, disable=args.quiet):
        batch = buckets.sample()
        frames = model.encoder.frame_lengths(batch.lengths)
        frame_mask = span_mask(frames, args.finetune_mask_prob, 5, min_masks=0, generator=generator)
        logits, frame_lengths = model(batch.audio, batch.lengths, frame_mask=frame_mask)
        loss = (
            F.ctc_loss(
                logits.float().log_softmax(-1).transpose(0, 1),
                batch.targets.clamp_min(0),
                frame_lengths,
                batch.target_lengths,
                blank=tokenizer.blank_id,
                reduction="sum",
                zero_infinity=True,
            )
            / batch.target_lengths.sum()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()

    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for item in splits[f"{lang}_test"]:  # one at a time: the group-norm CNN is padding-sensitive
            audio = item["waveform"][None]
            logits, frame_lengths = model(audio, torch.tensor([audio.shape[1]]))
            hyp = ctc_greedy_decode(logits, frame_lengths, tokenizer.blank_id)[0]
            counts += error_counts([item["phonemes"]], [tokenizer.decode(hyp)])
    return 100.0 * float(counts[0] / counts[1])


def run_seed(seed: int, rows: list[str], langs: list[str], splits, tokenizer, args) -> dict:
    from speechlab.models.unispeech import unispeech_tiny

    encoder_config = unispeech_tiny(tokenizer.vocab_size).encoder
    result = {"seed": seed, "per": {}, "pretrain": {}, "seconds": {}}
    for row in rows:
        state = None
        if row in PRETRAIN:
            # Pretrained encoders are cached so that per-language fine-tuning jobs can run in parallel.
            cache = args.out / f"encoder_seed{seed}_row{row}_{args.pretrain_steps}steps.pt"
            if cache.is_file():
                saved = torch.load(cache, weights_only=True)
                state, summary = saved["state"], saved["summary"]
            else:
                state, summary = pretrain(row, splits, tokenizer, args, seed)
                torch.save({"state": state, "summary": summary}, cache)
            result["pretrain"][row] = summary
            if args.pretrain_only:
                continue
        start = time.process_time()
        result["per"][row] = {
            lang: finetune_and_score(state, lang, splits, tokenizer, args, seed, encoder_config)
            for lang in langs
        }
        result["seconds"][row] = time.process_time() - start
        if not args.quiet:
            print(f"seed {seed} {ROWS[row]}: {result['per'][row]}", file=sys.stderr, flush=True)
    return result


# -------------------------------------------------------------------------------------------------------- report
def merge_seed(out: Path, seed: int) -> dict:
    merged = {"seed": seed, "per": {}, "pretrain": {}, "seconds": {}}
    for row in ROWS:
        for path in sorted(out.glob(f"seed_{seed}_row_{row}_*.json")):
            part = json.loads(path.read_text())
            merged["per"].setdefault(row, {}).update(part["per"][row])
            merged["pretrain"].update(part["pretrain"])  # identical across language jobs (same seed)
            merged["seconds"][row] = merged["seconds"].get(row, 0.0) + part["seconds"][row]
        missing = [lang for lang in LOW_RESOURCE if lang not in merged["per"].get(row, {})]
        if missing:
            raise SystemExit(
                f"{out}: no result for seed {seed}, row {row}, languages {missing}: run them first"
            )
    return merged


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: list[dict], args) -> str:
    seeds = [r["seed"] for r in results]
    lines = [
        f"PER (%) on each language's held-out split (10 utterances), greedy CTC; mean ± std over seeds {seeds}; "
        f"pretraining {args.pretrain_steps} steps, fine-tuning {args.finetune_steps} steps, batch {args.batch_size}.",
        "",
        "| row | " + " | ".join(LOW_RESOURCE) + " | mean |",
        "|---|" + "---|" * (len(LOW_RESOURCE) + 1),
    ]
    means = {}
    for row, name in ROWS.items():
        cells = [_fmt([r["per"][row][lang] for r in results]) for lang in LOW_RESOURCE]
        per_seed_mean = [statistics.fmean(r["per"][row].values()) for r in results]
        means[row] = statistics.fmean(per_seed_mean)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(per_seed_mean)} |")
    if means["b"] > 0:
        lines += [
            "",
            f"Relative PER change of (d) vs (b): {100 * (means['d'] - means['b']) / means['b']:+.1f} %; "
            f"(c) vs (b): {100 * (means['c'] - means['b']) / means['b']:+.1f} %; "
            f"(d) vs (c): {100 * (means['d'] - means['c']) / max(means['c'], 1e-9):+.1f} % (negative = better).",
        ]
    pre = ["", "Pretraining losses (mean of the last 20 steps, mean over seeds):", ""]
    pre += [
        "| row | contrastive / frame | CTC / phone (en) | diversity | code perplexity | contrastive acc. |"
    ]
    pre += ["|---|---|---|---|---|---|"]
    for row in PRETRAIN:
        values = {
            k: statistics.fmean(r["pretrain"][row][k] for r in results) for k in results[0]["pretrain"][row]
        }
        ctc = f"{values['ctc']:.3f}" if values["num_labeled"] > 0 else "—"
        pre.append(
            f"| {ROWS[row]} | {values['contrastive']:.3f} | {ctc} | {values['diversity']:.3f} | "
            f"{values['code_perplexity']:.1f} | {values['accuracy']:.3f} |"
        )
    cpu = sum(
        sum(r["seconds"].values()) + sum(p.get("cpu_seconds", 0.0) for p in r["pretrain"].values())
        for r in results
    )
    return "\n".join(
        lines
        + pre
        + [
            "",
            f"CPU time (process time of pretraining, fine-tuning and scoring, all seeds): {cpu / 60:.1f} min.",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "espeak" / "manifest.jsonl")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "recipes" / "mini" / "exp" / "unispeech_experiment"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run (rows a-d) per seed")
    parser.add_argument(
        "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run (default all)"
    )
    parser.add_argument(
        "--langs",
        nargs="+",
        default=list(LOW_RESOURCE),
        choices=list(LOW_RESOURCE),
        help="languages to fine-tune on",
    )
    parser.add_argument(
        "--pretrain-only", action="store_true", help="only pretrain rows b-d and cache the encoders in --out"
    )
    parser.add_argument(
        "--merge", action="store_true", help="only merge <out>/seed_*_row_*.json into the table"
    )
    parser.add_argument("--pretrain-steps", type=int, default=200, help="pretraining steps of rows b-d")
    parser.add_argument("--finetune-steps", type=int, default=100, help="CTC steps of every row and language")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per step")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak learning rate of pretraining")
    parser.add_argument("--finetune-lr", type=float, default=2e-3, help="peak learning rate of fine-tuning")
    parser.add_argument(
        "--warmup", type=int, default=20, help="linear warm-up steps (then linear decay to 0)"
    )
    parser.add_argument(
        "--num-negatives", type=int, default=50, help="contrastive distractors per masked frame"
    )
    parser.add_argument(
        "--finetune-mask-prob", type=float, default=0.2, help="span masking during fine-tuning"
    )
    parser.add_argument("--max-seconds", type=float, default=8.0, help="drop longer utterances (CPU budget)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars / per-row prints")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.merge:
        splits, tokenizer = load_corpus(args.manifest, args.max_seconds)
        for seed in args.seeds:
            for row in args.rows:  # one file per (seed, row, languages): rows / languages can run in parallel
                result = run_seed(seed, [row], args.langs, splits, tokenizer, args)
                if args.pretrain_only:
                    continue
                name = f"seed_{seed}_row_{row}_{'-'.join(args.langs)}.json"
                (args.out / name).write_text(json.dumps(result, indent=1))
        if (
            args.pretrain_only
            or sorted(args.rows) != sorted(ROWS)
            or sorted(args.langs) != sorted(LOW_RESOURCE)
        ):
            return 0
    results = [merge_seed(args.out, s) for s in args.seeds]
    text = table(results, args)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": results}, default=str, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
