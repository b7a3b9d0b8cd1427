"""WavLM Base on CPU: speechlab ``SSLEncoder`` vs ``transformers.WavLMModel`` (eager), same weights, same input.

Measures, in one process with the implementations called in turn (rotating order each round; the ratio is the
median over rounds of the per-round ratio against transformers fp32):

- feature extraction: 4 clips of 10 / 8 / 6 / 4 s zero-padded to 10 s, all hidden states, fp32 and bf16 autocast,
  under ``torch.no_grad`` and ``torch.inference_mode``; max abs difference to transformers on valid frames;
- a training step: 4 x 4 s, forward + backward of a HuBERT-style masked-prediction loss (768->256 projection, cosine
  against 504 label embeddings / 0.1, cross-entropy on masked frames; span mask p=0.65, length 10, passed to both),
  dropout 0.1, layerdrop 0, fp32 and bf16 autocast;
- peak extra memory of each configuration, one subprocess per measurement: the kernel's peak-RSS counter (VmHWM) is
  reset (``/proc/self/clear_refs`` = 5) after the model is built, then read after one call; Δ = peak - RSS before
  the call (first call: includes the parameter gradients). The child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so
  freed tensors leave RSS at once. ``tracemalloc`` does not see torch's allocations (they bypass Python's allocator), and torch has no
  CPU allocator statistics API, so RSS is the measure (falls back to ``ru_maxrss`` where clear_refs is unavailable).

The machine is shared: the load average is printed with every result; compare ratios, not absolute seconds.

Usage: ``python benchmarks/wavlm.py [--quick] [--repeats N] [--threads 2] [--skip-memory] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlab.checkpoints.hf_ssl import config_from_hf, state_dict_from_hf  # noqa: E402
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig  # noqa: E402
from speechlab.nn.feature_encoder import conv_output_lengths  # noqa: E402
from speechlab.nn.masking import span_mask  # noqa: E402

SAMPLE_RATE = 16000


# ----------------------------------------------------------------------------------------------- setup


def build_models(seed: int = 0):
    """Random-init WavLM Base in transformers (no SpecAugment, layerdrop 0) and the same weights in ours."""
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    hf_config = WavLMConfig(layerdrop=0.0, mask_time_prob=0.05, apply_spec_augment=True)
    hf_model = WavLMModel(hf_config)
    config = config_from_hf(hf_config.to_dict())
    ours = SSLEncoder(config)
    ours.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config), strict=True)
    return hf_model, ours


def extraction_inputs(quick: bool):
    seconds = [5, 4, 3, 2] if quick else [10, 8, 6, 4]
    generator = torch.Generator().manual_seed(1)
    width = seconds[0] * SAMPLE_RATE
    audio = torch.zeros(len(seconds), width)
    lengths = torch.tensor([s * SAMPLE_RATE for s in seconds])
    for i, n in enumerate(lengths.tolist()):
        audio[i, :n] = torch.randn(n, generator=generator) * 0.1
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return audio, lengths, attention_mask


def training_inputs(quick: bool):
    seconds = 2 if quick else 4
    generator = torch.Generator().manual_seed(2)
    audio = torch.randn(4, seconds * SAMPLE_RATE, generator=generator) * 0.1
    frames = int(conv_output_lengths(torch.tensor([audio.shape[1]]), SSLEncoderConfig().conv_layers)[0])
    frame_mask = span_mask((4, frames), 0.65, 10, generator=generator)
    targets = torch.randint(4, 504, (4, frames), generator=generator)
    return audio, frame_mask, targets


class MaskedPredictionHead(nn.Module):
    """HuBERT-style proxy loss: cos(final_proj(x), label_emb) / 0.1, CE on masked frames."""

    def __init__(self, dim: int = 768, final_dim: int = 256, classes: int = 504):
        super().__init__()
        self.final_proj = nn.Linear(dim, final_dim)
        self.label_embs = nn.Parameter(torch.rand(classes, final_dim))

    def forward(self, hidden, frame_mask, targets):
        projected = F.normalize(self.final_proj(hidden[frame_mask]).float(), dim=-1)
        logits = (
            projected @ F.normalize(self.label_embs.float(), dim=-1).t() / 0.1
        )  # cosine / 0.1, no (N, C, D)
        return F.cross_entropy(logits, targets[frame_mask])


# ----------------------------------------------------------------------------------------------- calls


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_context(name: str):
    return torch.inference_mode() if name == "inference_mode" else torch.no_grad()


def extract_call(impl: str, model, inputs, precision: str, context: str) -> Callable[[], list[torch.Tensor]]:
    audio, lengths, attention_mask = inputs

    def run():
        with grad_context(context), autocast(precision):
            if impl == "hf":
                return list(
                    model(audio, attention_mask=attention_mask, output_hidden_states=True).hidden_states
                )
            out = model(audio, lengths, output_hidden_states=True)
            return list(out.hidden_states)

    return run


def train_call(impl: str, model, head, inputs, precision: str) -> Callable[[], float]:
    audio, frame_mask, targets = inputs
    params = list(model.parameters()) + list(head.parameters())

    def run():
        for p in params:
            p.grad = None
        with autocast(precision):
            if impl == "hf":
                hidden = model(audio, mask_time_indices=frame_mask).last_hidden_state
            else:
                hidden = model(audio, frame_mask=frame_mask).last_hidden_state
            loss = head(hidden, frame_mask, targets)
        loss.backward()
        return loss.item()

    return run


def interleaved(calls: dict[str, Callable], repeats: int, reference: str) -> dict[str, dict]:
    """Warm up each call once, then ``repeats`` rounds in rotating order; per-round ratio vs ``reference``."""
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name in names:
        ratios = [ref / t for ref, t in zip(times[reference], times[name], strict=True)]
        results[name] = {
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "speedup_vs_hf_fp32": statistics.median(ratios),
        }
    return results


# ----------------------------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_memory_child(
    impl: str, task: str, precision: str, context: str, quick: bool, threads: int
) -> dict:
    torch.set_num_threads(threads)
    hf_model, ours = build_models()
    model = hf_model if impl == "hf" else ours
    if impl == "hf":
        del ours
    else:
        del hf_model
    gc.collect()
    if task == "extract":
        model.eval()
        call = extract_call(impl, model, extraction_inputs(quick), precision, context)
    else:
        model.train()
        torch.manual_seed(3)
        head = MaskedPredictionHead()
        call = train_call(impl, model, head, training_inputs(quick), precision)
    gc.collect()
    before = _rss_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    peak = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "impl": impl,
        "task": task,
        "precision": precision,
        "context": context,
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "delta_mb": (peak - before) / 1024,
        "method": "VmHWM after clear_refs"
        if reset
        else f"ru_maxrss (baseline max {baseline_maxrss / 1024:.0f} MB)",
    }


def measure_memory(impl: str, task: str, precision: str, context: str, quick: bool, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        impl,
        task,
        precision,
        context,
        "--threads",
        str(threads),
    ]
    if quick:
        command.append("--quick")
    # A fixed mmap threshold makes every large tensor its own mapping, returned to the OS when freed, so RSS tracks
    # live memory (glibc's dynamic threshold otherwise keeps freed model-building memory for reuse, hiding peaks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        return {"impl": impl, "task": task, "precision": precision, "error": result.stderr.strip()[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- main


def max_valid_diff(
    reference: list[torch.Tensor], ours: list[torch.Tensor], lengths_frames: torch.Tensor
) -> float:
    valid = torch.arange(reference[0].shape[1])[None] < lengths_frames[:, None]
    return max(
        (a.float() - b.float())[valid].abs().max().item() for a, b in zip(reference, ours, strict=True)
    )


def run_benchmark(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    records: list[dict] = []
    hf_model, ours = build_models()
    hf_model.eval()
    ours.eval()

    def emit(record: dict) -> None:
        record["loadavg_1m"] = os.getloadavg()[0]
        record["threads"] = args.threads
        record["quick"] = args.quick
        records.append(record)
        print(json.dumps(record), flush=True)

    precisions = ("fp32",) if args.no_bf16 else ("fp32", "bf16")
    emit({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "precisions": precisions})
    if "extract" in args.tasks:
        inputs = extraction_inputs(args.quick)
        frames = ours.frame_lengths(inputs[1])
        reference = extract_call("hf", hf_model, inputs, "fp32", "no_grad")()
        for precision, context in (("fp32", "no_grad"), ("bf16", "no_grad"), ("fp32", "inference_mode"),
                                   ("bf16", "inference_mode")):  # fmt: skip
            if precision not in precisions:
                continue
            got = extract_call("ours", ours, inputs, precision, context)()
            emit({"check": "extract", "precision": precision, "context": context,
                  "max_abs_diff_vs_hf_fp32_valid_frames": max_valid_diff(reference, got, frames)})  # fmt: skip
        calls = {
            "hf_fp32_no_grad": extract_call("hf", hf_model, inputs, "fp32", "no_grad"),
            "ours_fp32_no_grad": extract_call("ours", ours, inputs, "fp32", "no_grad"),
            "ours_bf16_no_grad": extract_call("ours", ours, inputs, "bf16", "no_grad"),
            "ours_fp32_inference_mode": extract_call("ours", ours, inputs, "fp32", "inference_mode"),
            "ours_bf16_inference_mode": extract_call("ours", ours, inputs, "bf16", "inference_mode"),
        }
        calls = {name: call for name, call in calls.items() if "bf16" not in name or "bf16" in precisions}
        if args.hf_bf16:
            calls["hf_bf16_no_grad"] = extract_call("hf", hf_model, inputs, "bf16", "no_grad")
        audio_seconds = inputs[1].sum().item() / SAMPLE_RATE
        for name, result in interleaved(calls, args.repeats, "hf_fp32_no_grad").items():
            emit(
                {
                    "task": "extract",
                    "impl": name,
                    "audio_s_per_s": audio_seconds / result["median_s"],
                    **result,
                }
            )

    if "train" in args.tasks:
        hf_model.train()
        ours.train()
        inputs = training_inputs(args.quick)
        torch.manual_seed(3)
        head_hf = MaskedPredictionHead()
        head_ours = MaskedPredictionHead()
        head_ours.load_state_dict(head_hf.state_dict())
        calls = {
            "hf_fp32": train_call("hf", hf_model, head_hf, inputs, "fp32"),
            "ours_fp32": train_call("ours", ours, head_ours, inputs, "fp32"),
            "ours_bf16": train_call("ours", ours, head_ours, inputs, "bf16"),
        }
        calls = {name: call for name, call in calls.items() if "bf16" not in name or "bf16" in precisions}
        if args.hf_bf16:
            calls["hf_bf16"] = train_call("hf", hf_model, head_hf, inputs, "bf16")
        audio_seconds = inputs[0].numel() / SAMPLE_RATE
        for name, result in interleaved(calls, args.repeats, "hf_fp32").items():
            emit(
                {"task": "train", "impl": name, "audio_s_per_s": audio_seconds / result["median_s"], **result}
            )
        hf_model.eval()
        ours.eval()

    if not args.skip_memory:
        del hf_model, ours
        gc.collect()
        plan = []
        if "extract" in args.tasks:
            plan += [("hf", "extract", "fp32", "no_grad"), ("ours", "extract", "fp32", "no_grad"),
                     ("ours", "extract", "bf16", "no_grad")]  # fmt: skip
        if "train" in args.tasks:
            plan += [
                ("hf", "train", "fp32", "grad"),
                ("ours", "train", "fp32", "grad"),
                ("ours", "train", "bf16", "grad"),
            ]
        memory = {}
        plan = [entry for entry in plan if entry[2] in precisions]
        for impl, task, precision, context in plan:
            record = measure_memory(impl, task, precision, context, args.quick, args.threads)
            memory[(impl, task, precision)] = record
            emit({"memory": True, **record})
        for task in ("extract", "train"):
            hf = memory.get(("hf", task, "fp32"), {})
            for precision in ("fp32", "bf16"):
                mine = memory.get(("ours", task, precision), {})
                if "delta_mb" in hf and "delta_mb" in mine:
                    emit(
                        {
                            "memory_ratio": f"{task} ours {precision} / hf fp32",
                            "ratio": mine["delta_mb"] / hf["delta_mb"],
                        }
                    )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="half-length clips (5/4/3/2 s and 4 x 2 s), 1 round"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per configuration (default 3, quick 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--tasks", default="extract,train", help="comma list of: extract, train (default both)"
    )
    parser.add_argument("--hf-bf16", action="store_true", help="also time transformers under bf16 autocast")
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="fp32 only: on CPUs without native bf16 (cpu_capability AVX2) bf16 matmuls are emulated, ~20x slower",
    )
    parser.add_argument(
        "--skip-memory", action="store_true", help="skip the per-configuration memory subprocesses"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="append every record as a JSON line to this file"
    )
    parser.add_argument(
        "--memory-child", nargs=4, metavar=("IMPL", "TASK", "PRECISION", "CONTEXT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(measure_memory_child(*args.memory_child, quick=args.quick, threads=args.threads)))
        return 0
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    records = run_benchmark(args)
    if args.json:
        with args.json.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
