"""Feature-extraction speed and long-input memory: speechlab FeatureExtractor vs transformers, same weights.

    python benchmarks/extract.py            # --quick: 4 utterances of 5/4/3/2 s, 3 rounds, 10-minute long input
    python benchmarks/extract.py --full     # wavlm.py's batch: 10/8/6/4 s padded to 10 s, 5 rounds, 1-hour input

Model: WavLM Base (94.4 M parameters, random init from ``transformers.WavLMConfig()``), copied into speechlab through
``save_pretrained`` + ``speechlab.load``. CPU, ``torch.set_num_threads(2)`` (``--threads``). Implementations are
called in rotation (A B C .., then reversed) and the speed ratio is the median of per-round ratios against
transformers fp32. Outputs are compared on valid frames of every hidden state:

* ``hf``: transformers ``WavLMModel``, padded batch + attention mask, ``no_grad`` (its usual use).
* ``ours``: FeatureExtractor on the same padded batch (same work, same GroupNorm-over-padding semantics).
* ``ours-exact``: FeatureExtractor(exact=True): each length runs unpadded (no padding work; for this Base model it
  gives every utterance its single-utterance features, compared with transformers run one utterance at a time).
* ``*-bf16``: the same under ``torch.autocast(cpu, bfloat16)`` (transformers under ``no_grad``, its faster context).
  Only worthwhile on CPUs with native bf16 (AVX512-BF16 / AMX); on AVX2-only CPUs bf16 matmuls are emulated and
  several times slower than fp32.

Absolute times on a shared machine are noisy: the table also reports process CPU seconds (robust to other load
with ``--threads 1``) and CPU utilisation (CPU seconds / (wall x threads); well below 1 means contended).

The long-input part runs in a fresh subprocess: peak RSS growth (``VmHWM`` after resetting it via
``/proc/self/clear_refs``, else a polling thread) while extracting the last layer of a long input in chunked mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def build_models(seed: int = 0):
    """(transformers WavLMModel Base, speechlab model with the same weights)."""
    from transformers import WavLMConfig, WavLMModel

    from speechlab.api import load

    torch.manual_seed(seed)
    hf = WavLMModel(WavLMConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load(tmp)
    return hf, ours


def make_batch(seconds: list[float], seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Noise-like 'speech' (random weights do not care) -> (waves, padded (B, S), attention mask (B, S))."""
    generator = torch.Generator().manual_seed(seed)
    waves = [0.1 * torch.randn(int(s * 16000), generator=generator) for s in seconds]
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    mask = torch.zeros_like(padded, dtype=torch.long)
    for i, w in enumerate(waves):
        mask[i, : w.numel()] = 1
    return waves, padded, mask


def run_speed(args: argparse.Namespace) -> dict:
    from speechlab.api import FeatureExtractor

    seconds = [10.0, 8.0, 6.0, 4.0] if args.full else [5.0, 4.0, 3.0, 2.0]
    rounds = args.rounds or (5 if args.full else 3)
    hf, ours = build_models()
    waves, padded, mask = make_batch(seconds)
    real_seconds = sum(seconds)
    lengths = torch.tensor([w.numel() for w in waves])

    def hf_call(bf16: bool):
        def call():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = hf(padded, attention_mask=mask, output_hidden_states=True)
            return torch.stack(out.hidden_states).float()

        return call

    def ours_call(exact: bool, bf16: bool):
        extractor = FeatureExtractor(ours, exact=exact, bf16=bf16, chunk_seconds=None)

        def call():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return extractor(padded, lengths).hidden_states

        return call

    factories = {
        "hf": lambda: hf_call(False),
        "ours": lambda: ours_call(False, False),
        "ours-exact": lambda: ours_call(True, False),
        "hf-bf16": lambda: hf_call(True),
        "ours-bf16": lambda: ours_call(False, True),
        "ours-exact-bf16": lambda: ours_call(True, True),
    }
    wanted = set(args.impls.split(",")) | {"hf"} if args.impls else set(factories)
    impls = {name: make() for name, make in factories.items() if name in wanted}

    # correctness, untimed: padded-vs-padded and exact-vs-one-at-a-time, valid frames of every hidden state
    frames = ours.frame_lengths(lengths)
    hf_padded = impls["hf"]()
    with torch.no_grad():
        hf_single = [torch.stack(hf(w[None], output_hidden_states=True).hidden_states)[:, 0] for w in waves]

    def max_diff(states: torch.Tensor, reference: str) -> float:
        worst = 0.0
        for b, n in enumerate(frames.tolist()):
            ref = hf_padded[:, b, :n] if reference == "padded" else hf_single[b][:, :n]
            worst = max(worst, float((states[:, b, :n] - ref).abs().max()))
        return worst

    results: dict[str, dict] = {}
    for name, call in impls.items():
        states = call()  # also the warm-up call
        reference = "single" if "exact" in name else "padded"
        results[name] = {
            "max_abs_diff": max_diff(states, reference),
            "vs": f"transformers {reference}",
            "times": [],
        }

    names = list(impls)
    cpu_util = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            cpu0, t0 = time.process_time(), time.perf_counter()
            impls[name]()
            wall = time.perf_counter() - t0
            results[name]["times"].append(wall)
            cpu_times[name].append(time.process_time() - cpu0)
            cpu_util[name].append(cpu_times[name][-1] / (wall * args.threads))
    hf_times, hf_cpu = results["hf"]["times"], cpu_times["hf"]
    for name in names:
        times = results[name]["times"]
        results[name].update(
            median_s=statistics.median(times),
            audio_s_per_s=real_seconds / statistics.median(times),
            ratio_vs_hf=statistics.median(h / t for h, t in zip(hf_times, times, strict=True)),
            median_cpu_s=statistics.median(cpu_times[name]),
            cpu_ratio_vs_hf=statistics.median(h / t for h, t in zip(hf_cpu, cpu_times[name], strict=True)),
            cpu_util=statistics.median(cpu_util[name]),
        )
    return {
        "seconds": seconds,
        "rounds": rounds,
        "threads": args.threads,
        "loadavg": _loadavg(),
        "impls": results,
    }


def run_long_child(args: argparse.Namespace) -> None:
    """In a fresh process: build a Base model (random init), extract the last layer of a long input in chunks."""
    torch.set_num_threads(args.threads)
    from speechlab.api import FeatureExtractor
    from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig

    torch.manual_seed(0)
    model = SSLEncoder(SSLEncoderConfig()).eval()  # Base defaults (GroupNorm conv encoder, 12 layers, 768)
    audio = 0.1 * torch.randn(int(args.long_seconds * 16000))
    extractor = FeatureExtractor(model, layers=[-1], bf16=args.long_bf16)
    peak = {"kb": 0}
    stop = threading.Event()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM high-water mark
        use_hwm = True
    except OSError:
        use_hwm = False

        def poll():
            while not stop.is_set():
                peak["kb"] = max(peak["kb"], _rss_kb())
                time.sleep(0.005)

        threading.Thread(target=poll, daemon=True).start()
    before = _rss_kb()
    t0 = time.perf_counter()
    features = extractor(audio)
    wall = time.perf_counter() - t0
    stop.set()
    peak_kb = _rss_kb("VmHWM") if use_hwm else peak["kb"]
    output_mb = features.hidden_states.numel() * 4 / 2**20
    print(
        json.dumps(
            {
                "long_seconds": args.long_seconds,
                "frames": int(features.lengths[0]),
                "bf16": args.long_bf16,
                "rss_before_mb": before / 1024,
                "peak_extra_mb": (peak_kb - before) / 1024,
                "output_mb": output_mb,
                "wall_s": wall,
                "audio_s_per_s": args.long_seconds / wall,
                "peak_method": "VmHWM reset" if use_hwm else "polling",
                "loadavg": _loadavg(),
            }
        )
    )


def run_long(args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--long-child", "--long-seconds", str(args.long_seconds),
               "--threads", str(args.threads)] + (["--long-bf16"] if args.long_bf16 else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="4 utterances of 10/8/6/4 s (as benchmarks/wavlm.py), 5 rounds, 1-hour input",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the default: short batch, 3 rounds, 10-minute input"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default 3 quick / 5 full)")
    parser.add_argument(
        "--impls", default="", help="comma list among hf,ours,ours-exact,hf-bf16,ours-bf16,..."
    )
    parser.add_argument(
        "--long-seconds", type=float, default=0.0, help="long input length (default 600 / 3600)"
    )
    parser.add_argument("--long-bf16", action="store_true", help="long input under bf16 autocast")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--long-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="append the result record to this file")
    args = parser.parse_args()
    if not args.long_seconds:
        args.long_seconds = 3600.0 if args.full else 600.0
    if args.long_child:
        run_long_child(args)
        return
    torch.set_num_threads(args.threads)
    record: dict = {"torch": torch.__version__, "full": args.full}
    if not args.skip_speed:
        speed = run_speed(args)
        record["speed"] = speed
        print(f"batch {speed['seconds']} s (real audio {sum(speed['seconds']):.0f} s), {speed['rounds']} interleaved "
              f"rounds, {speed['threads']} threads, loadavg {speed['loadavg']:.1f}")  # fmt: skip
        print(f"{'impl':18s} {'median s':>9s} {'audio-s/s':>10s} {'vs hf':>7s} {'cpu s':>8s} {'cpu vs hf':>9s} "
              f"{'cpu util':>8s}  max abs diff")  # fmt: skip
        for name, r in speed["impls"].items():
            print(f"{name:18s} {r['median_s']:9.3f} {r['audio_s_per_s']:10.2f} {r['ratio_vs_hf']:7.2f} "
                  f"{r['median_cpu_s']:8.2f} {r['cpu_ratio_vs_hf']:9.2f} {r['cpu_util']:8.2f}  "
                  f"{r['max_abs_diff']:.2e} vs {r['vs']}")  # fmt: skip
        print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()} (bf16 autocast is fast only with "
              "AVX512-BF16 / AMX or on GPU)")  # fmt: skip
    if not args.skip_long:
        long = run_long(args)
        record["long"] = long
        print(f"long input {long['long_seconds']:.0f} s, chunked, last layer, bf16={long['bf16']}: peak extra memory "
              f"{long['peak_extra_mb']:.0f} MB (output itself {long['output_mb']:.0f} MB), {long['wall_s']:.1f} s = "
              f"{long['audio_s_per_s']:.1f} audio-s/s, {long['peak_method']}")  # fmt: skip
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
