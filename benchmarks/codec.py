"""Codec speed on CPU: encode + decode real-time factor of speechlab codecs vs transformers EnCodec, one process.

RTF = (encode + decode wall time) / audio duration, lower is better. The models are called in rotation (A B, B A, ...)
so that load from other processes hits all of them alike; the table reports the median and best per model and the
median of per-round ratios against EnCodec. Random weights: speed does not depend on them.

    PYTHONPATH=. python benchmarks/codec.py --threads 2 --seconds 10 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="audio length per call in seconds (default 10)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--models",
        default="codec_16khz,encodec",
        help="comma list of speechlab presets and/or 'encodec' "
        "(transformers EncodecModel, default 24 kHz config); default: codec_16khz,encodec",
    )
    parser.add_argument("--n-q", type=int, default=None, help="codebooks for speechlab codecs (default: all)")
    parser.add_argument("--bandwidth", type=float, default=6.0, help="EnCodec bandwidth in kbps (default 6)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU seconds instead of wall seconds (use with "
        "--threads 1 on a shared machine: other load does not inflate it)",
    )
    parser.add_argument("--json", default=None, help="append one JSON record per model to this file")
    args = parser.parse_args()

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    runners = {}
    info = {}
    for name in args.models.split(","):
        name = name.strip()
        if name.split("@")[0] == "encodec":
            bandwidth = float(name.split("@")[1]) if "@" in name else args.bandwidth
            from transformers import EncodecConfig, EncodecModel

            model = EncodecModel(EncodecConfig()).eval()
            sr = model.config.sampling_rate
            audio = torch.randn(1, 1, int(sr * args.seconds)) * 0.1

            def run(model=model, audio=audio, bandwidth=bandwidth):
                out = model.encode(audio, bandwidth=bandwidth)
                return model.decode(out.audio_codes, out.audio_scales)

            n_params = sum(p.numel() for p in model.parameters())
            info[name] = {
                "sample_rate": sr,
                "params_M": round(n_params / 1e6, 2),
                "bitrate_kbps": bandwidth,
            }
        else:
            from speechlab.models.codec import PRESETS, Codec

            if name not in PRESETS:
                raise SystemExit(f"unknown model {name!r}: choose from {sorted(PRESETS)} or 'encodec'")
            model = Codec(PRESETS[name]()).eval().fold_weight_norm()
            sr = model.sample_rate
            audio = torch.randn(1, int(sr * args.seconds)) * 0.1

            def run(model=model, audio=audio):
                codes, frame_lengths = model.encode(audio, n_q=args.n_q)
                return model.decode(codes, frame_lengths)

            n_params = sum(p.numel() for p in model.parameters())
            info[name] = {
                "sample_rate": sr,
                "params_M": round(n_params / 1e6, 2),
                "bitrate_kbps": model.config.bitrate(args.n_q) / 1000,
            }
        with torch.inference_mode():
            run()  # warm-up
        runners[name] = run

    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            with torch.inference_mode():
                clock = time.process_time if args.cpu_time else time.perf_counter
                start = clock()
                runners[name]()
                times[name].append((clock() - start) / args.seconds)
    ref = next((n for n in names if n.startswith("encodec")), names[0])
    print(
        f"threads={args.threads} audio={args.seconds}s rounds={args.rounds} loadavg={os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'model':24s} {'params M':>9s} {'kbps':>6s} {'RTF median':>11s} {'RTF best':>9s} {'x RT':>6s} "
        f"{'speed vs ' + ref:>16s}"
    )
    for name in names:
        ratios = [a / b for a, b in zip(times[ref], times[name], strict=True)]
        med = statistics.median(times[name])
        record = {
            "model": name,
            **info[name],
            "rtf_median": med,
            "rtf_best": min(times[name]),
            "speedup_vs_" + ref: statistics.median(ratios),
            "threads": args.threads,
            "seconds": args.seconds,
            "cpu_time": args.cpu_time,
            "rounds": args.rounds,
            "loadavg_1m": os.getloadavg()[0],
        }
        print(
            f"{name:24s} {info[name]['params_M']:9.2f} {info[name]['bitrate_kbps']:6.2f} {med:11.4f} "
            f"{min(times[name]):9.4f} {1 / med:6.1f} {statistics.median(ratios):15.2f}x"
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
