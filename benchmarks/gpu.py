"""WavLM Base pretraining steps on one GPU (bf16): throughput, memory, host syncs, SDPA vs FlexAttention.

One training step is what Lightning runs for ``WavLMPretrainTask`` under ``bf16-mixed`` with automatic optimisation:
utterance mixing (speech partner or noise) -> span mask -> encoder -> masked unit prediction loss -> backward ->
``on_before_optimizer_step`` (the on-device non-finite check) -> fused AdamW (on CUDA) -> scheduler ->
``on_train_batch_end``. The batch is random audio with random unit targets (504 classes), ``--batch`` utterances
whose lengths fall evenly from ``--seconds`` to 0.75 x that (a length-bucketed batch); a fresh batch is copied from
pinned host memory each step, as a DataLoader would deliver it.

Reported, per attention backend (``sdpa``: additive (B, H, T, T) mask; ``flex``: FlexAttention ``score_mod``), the
backends timed in rotation over ``--rounds`` rounds of ``--steps`` steps after ``--warmup`` steps each:

- ``audio_s_per_gpu_s``: real (unpadded) audio seconds trained per wall-clock second of the timed steps (one device);
- ``peak_memory_mb``: ``torch.cuda.max_memory_allocated`` over the timed steps (CPU: the process's peak RSS);
- ``in_step_fraction``: time between the start and the end of the steps on the device's timeline (CUDA events; on the
  CPU the host clock) over the wall-clock time of the loop, which also holds the batch copies and Python overhead;
- ``cuda_sync_warnings``: synchronising CUDA calls during the timed steps, counted as the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` (the most in one round; a round that crosses a multiple of
  ``SpeechTask.nonfinite_check_every`` batches includes that one read of the non-finite counters, by design);
- ``host_reads``: the host reads of tensor values in one step on the accelerator code path, by call site, from
  :class:`speechlab.host_sync.HostSyncCounter` (on the CPU that path is forced with ``device_path()``; LayerDrop's
  keep flags are a CPU tensor from a CPU generator, read without waiting for the device);
- ``flex_speedup``: median over rounds of SDPA step time / FlexAttention step time (> 1: FlexAttention faster).

FlexAttention has no attention dropout, so the default here is ``--attention-dropout 0`` (WavLM Base trains with 0.1:
with ``--attention-dropout 0.1`` only SDPA runs). On the CPU FlexAttention has no backward pass: the ``flex`` rows are
skipped there with that reason. With two or more GPUs (or ``--ddp on``), a DDP smoke run follows: two processes
(NCCL on GPUs, gloo on the CPU) train ``--ddp-steps`` steps and check that their weights stay identical.

Usage: ``python benchmarks/gpu.py [--device cuda] [--preset base] [--batch 16 --seconds 10] [--steps 10]
[--rounds 3] [--json FILE]``; a CPU smoke run: ``python benchmarks/gpu.py --device cpu --preset tiny --steps 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlab.augment.mixing import MixingConfig, UtteranceMixer  # noqa: E402
from speechlab.data.collate import UNIT_PAD, Batch  # noqa: E402
from speechlab.host_sync import HostSyncCounter, device_path  # noqa: E402
from speechlab.optim import OptimConfig, build_optimizer  # noqa: E402

if TYPE_CHECKING:
    from speechlab.tasks.wavlm_pretrain import WavLMPretrainTask

SAMPLE_RATE = 16000
NUM_CLASSES = 504
PRESETS = {"base": "wavlm_base", "base_plus": "wavlm_base_plus", "large": "wavlm_large", "tiny": "wavlm_tiny"}
SYNC_WARNING = "called a synchronizing CUDA operation"
GOAL_AUDIO_S_PER_GPU_S = 4000  # H100/H200 goal (benchmarks/README.md), stretch 7700


# ----------------------------------------------------------------------------------------------- setup


def encoder_overrides(args) -> dict:
    overrides: dict = {"layerdrop": args.layerdrop, "attention_dropout": args.attention_dropout}
    if args.width is not None:
        heads = max(1, args.width // 64)
        overrides.update(hidden_size=args.width, num_heads=heads, ffn_size=4 * args.width)
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    return overrides


def build_task(args, device: torch.device, seed: int = 0) -> WavLMPretrainTask:
    """WavLM pretraining task of the chosen preset (random init), with noise + speech mixing, on ``device``."""
    # imported here, not at the top, so that --help does not import Lightning (~7 s)
    from speechlab.tasks.wavlm_pretrain import WavLMPretrainTask

    torch.manual_seed(seed)
    task = WavLMPretrainTask(
        encoder=PRESETS[args.preset],
        encoder_overrides=encoder_overrides(args),
        num_classes=NUM_CLASSES,
        final_dim=256,
        mixing=MixingConfig(mix_prob=0.5, noise_prob=0.5),
    )
    noise = [
        0.05 * torch.randn(SAMPLE_RATE * 2, generator=torch.Generator().manual_seed(seed + i))
        for i in range(4)
    ]
    task.mixer = UtteranceMixer(noise, mix_prob=0.5, noise_prob=0.5, seed=seed)
    return task.to(device).train()


def make_batches(args, count: int, pin: bool) -> list[Batch]:
    """``count`` CPU batches of random audio and unit targets (pinned for asynchronous copies on CUDA)."""
    generator = torch.Generator().manual_seed(1)
    width = int(args.seconds * SAMPLE_RATE)
    lengths = torch.linspace(width, 0.75 * width, args.batch).long()
    frames = lengths // 320
    batches = []
    for _ in range(count):
        audio = 0.1 * torch.randn(args.batch, width, generator=generator)
        audio = audio.masked_fill(torch.arange(width)[None] >= lengths[:, None], 0.0)
        units = torch.randint(0, NUM_CLASSES, (args.batch, width // 320), generator=generator)
        units = units.masked_fill(torch.arange(units.shape[1])[None] >= frames[:, None], UNIT_PAD)
        if pin:
            audio, units = audio.pin_memory(), units.pin_memory()
        ids = [str(i) for i in range(args.batch)]
        batches.append(Batch(ids=ids, audio=audio, lengths=lengths.clone(), units=units))
    return batches


def to_device(batch: Batch, device: torch.device) -> Batch:
    return dataclasses.replace(
        batch,
        audio=batch.audio.to(device, non_blocking=True),
        lengths=batch.lengths.to(device, non_blocking=True),
        units=batch.units.to(device, non_blocking=True),
    )


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    task, optimizer, scheduler, batch: Batch, batch_idx: int, precision: str, ddp=None
) -> torch.Tensor:
    """One automatic-optimisation step, as Lightning runs it (no gradient clipping)."""
    with autocast(batch.audio.device, precision):
        loss = ddp(batch, batch_idx) if ddp is not None else task.training_step(batch, batch_idx)
    loss.backward()
    task.on_before_optimizer_step(optimizer)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    task.on_train_batch_end(loss, batch, batch_idx)
    return loss


def build_optimizer_for(task, steps: int):
    """The task's AdamW + schedule, fused on every device (on the CPU too, so the CPU run takes the accelerator's
    on-device non-finite check)."""
    config = OptimConfig(warmup_steps=2)
    built = build_optimizer(task.named_parameters(), config, total_steps=max(steps, 10), fused=True)
    return built["optimizer"], built["lr_scheduler"]["scheduler"]


# ----------------------------------------------------------------------------------------------- measuring


def backend_skip_reason(backend: str, device: torch.device, args) -> str | None:
    if backend == "flex" and device.type != "cuda":
        return "FlexAttention has no backward pass on the CPU (torch 2.11)"
    if backend == "flex" and args.attention_dropout > 0:
        return "FlexAttention has no attention dropout: rerun with --attention-dropout 0"
    return None


def time_steps(task, optimizer, scheduler, batches, args, device, first_idx: int) -> dict:
    """Time ``args.steps`` steps; returns wall, in-step time, audio seconds, peak memory and sync warnings."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(args.steps)
        ]
    host_in_step = 0.0
    audio_seconds = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            start = time.perf_counter()
            for step in range(args.steps):
                host_batch = batches[(first_idx + step) % len(batches)]
                audio_seconds += float(host_batch.lengths.sum()) / SAMPLE_RATE  # a CPU tensor: no device read
                batch = to_device(host_batch, device)
                step_start = time.perf_counter()
                if cuda:
                    events[step][0].record()
                train_step(task, optimizer, scheduler, batch, first_idx + step, args.precision)
                if cuda:
                    events[step][1].record()
                host_in_step += time.perf_counter() - step_start
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum(SYNC_WARNING in str(w.message) for w in caught)
    if cuda:
        in_step = sum(begin.elapsed_time(end) for begin, end in events) / 1000.0
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        in_step = host_in_step
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "wall_s": wall,
        "in_step_s": in_step,
        "audio_s": audio_seconds,
        "peak_memory_mb": peak,
        "syncs": syncs,
    }


def host_reads_one_step(task, optimizer, scheduler, batch, args, device, batch_idx: int) -> dict[str, int]:
    """Host reads of one step on the accelerator code path, counted by call site."""
    forced = device_path() if device.type == "cpu" else contextlib.nullcontext()
    with forced, HostSyncCounter() as counter:
        train_step(task, optimizer, scheduler, to_device(batch, device), batch_idx, args.precision)
    return dict(Counter(f"{s.kind} at {s.site}" for s in counter.syncs))


def run_benchmark(args) -> list[dict]:
    # the task logs through Lightning, which is not driving it here
    warnings.filterwarnings("ignore", message=".*self.trainer` reference is not registered")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    task = build_task(args, device)
    optimizer, scheduler = build_optimizer_for(task, args.warmup + args.rounds * args.steps * 2 + 1)
    batches = make_batches(args, count=max(2, min(args.steps, 4)), pin=device.type == "cuda")
    emit(
        {
            "setup": True,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "preset": args.preset,
            "encoder_overrides": encoder_overrides(args),
            "parameters_m": sum(p.numel() for p in task.parameters()) / 1e6,
            "precision": args.precision,
            "batch": args.batch,
            "seconds": args.seconds,
            "padded_audio_s_per_step": args.batch * args.seconds,
            "fused_adamw": bool(getattr(optimizer, "_step_supports_amp_scaling", False)),
        }
    )

    backends = [b for b in args.backends if backend_skip_reason(b, device, args) is None]
    for backend in args.backends:
        reason = backend_skip_reason(backend, device, args)
        if reason:
            emit({"backend": backend, "skipped": reason})
    batch_idx = 0
    for backend in backends:  # warm-up (compilation of the FlexAttention kernels happens here)
        task.encoder.encoder.attention_backend = backend
        for _ in range(args.warmup):
            train_step(task, optimizer, scheduler, to_device(batches[0], device), batch_idx, args.precision)
            batch_idx += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    results: dict[str, list[dict]] = {b: [] for b in backends}
    for round_idx in range(args.rounds):
        order = backends if round_idx % 2 == 0 else backends[::-1]
        for backend in order:
            task.encoder.encoder.attention_backend = backend
            results[backend].append(time_steps(task, optimizer, scheduler, batches, args, device, batch_idx))
            batch_idx += args.steps

    for backend in backends:
        runs = results[backend]
        wall = statistics.median(r["wall_s"] for r in runs)
        best = min(runs, key=lambda r: r["wall_s"])
        task.encoder.encoder.attention_backend = backend
        try:
            reads = host_reads_one_step(task, optimizer, scheduler, batches[0], args, device, batch_idx)
        except Exception as error:  # the counting mode is a debugging aid: report, do not lose the timings
            reads = {"error": f"{type(error).__name__}: {error}"[:500]}
        batch_idx += 1
        record = {
            "backend": backend,
            "step_s_median": wall / args.steps,
            "audio_s_per_gpu_s": statistics.median(r["audio_s"] / r["wall_s"] for r in runs),
            "audio_s_per_gpu_s_best": best["audio_s"] / best["wall_s"],
            "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "in_step_fraction": statistics.median(r["in_step_s"] / r["wall_s"] for r in runs),
            "cuda_sync_warnings": max(r["syncs"] for r in runs) if device.type == "cuda" else None,
            "host_reads": reads,
            "goal_audio_s_per_gpu_s": GOAL_AUDIO_S_PER_GPU_S if device.type == "cuda" else None,
        }
        emit(record)
    if "sdpa" in results and "flex" in results:
        ratios = [s["wall_s"] / f["wall_s"] for s, f in zip(results["sdpa"], results["flex"], strict=True)]
        emit({"flex_speedup": statistics.median(ratios), "rounds": args.rounds})

    run_ddp = args.ddp == "on" or (
        args.ddp == "auto" and device.type == "cuda" and torch.cuda.device_count() >= 2
    )
    if run_ddp:
        emit(ddp_smoke(args, device.type))
    elif args.ddp == "auto":
        emit({"ddp": "skipped", "reason": "fewer than 2 GPUs"})
    return records


# ----------------------------------------------------------------------------------------------- DDP smoke run


class _StepModule(torch.nn.Module):
    """DDP wraps this: forward = the task's training step (so DDP sees the parameters that make the loss)."""

    def __init__(self, task: WavLMPretrainTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.task.training_step(batch, batch_idx)


# A collective that waits longer than this fails instead of hanging (the smoke run takes seconds).
DDP_TIMEOUT = timedelta(seconds=120)


def _ddp_worker(rank: int, world: int, store_file: str, args, device_type: str, queue) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    # A worker still running after this long is stuck: print every thread's stack to stderr and exit, so the run
    # fails with the place it hung instead of hanging.
    faulthandler.dump_traceback_later(DDP_TIMEOUT.total_seconds() + 60 * args.ddp_steps, exit=True)
    # A file rendezvous: no port to pick, so nothing else on the machine can take it between the pick and the bind
    # (a TCP port picked free and bound later can be).
    torch.distributed.init_process_group(
        backend, init_method=f"file://{store_file}", rank=rank, world_size=world, timeout=DDP_TIMEOUT
    )
    try:
        # The DDP model lives only inside _ddp_train, so its reducer is freed before the process group is
        # destroyed. Freed after it (when this function returned), the reducer held the group's last reference and
        # destroyed it while this thread held the GIL, joining gloo's worker thread, which was freeing a finished
        # all-reduce's tensors and waited for that GIL: a deadlock (py-spy stacks, 2026-12-01, ~1 run in 5).
        result = _ddp_train(rank, args, device_type)
        gc.collect()
        if rank == 0:
            queue.put(result)
        # The group's destructor runs in destroy_process_group with the GIL held, so gloo's thread must be done
        # freeing the last all-reduce first: this sleep releases the GIL to it.
        time.sleep(0.2)
    finally:
        torch.distributed.destroy_process_group()


def _ddp_train(rank: int, args, device_type: str) -> dict:
    """One DDP rank: ``args.ddp_steps`` timed steps after a warm-up step; the ranks' largest weight difference."""
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    task = build_task(args, device, seed=0)  # same initial weights on every rank
    wrapped = torch.nn.parallel.DistributedDataParallel(task_module := _StepModule(task))
    optimizer, scheduler = build_optimizer_for(task, args.ddp_steps + 1)
    batches = make_batches(args, count=2, pin=device_type == "cuda")
    train_step(task, optimizer, scheduler, to_device(batches[rank % 2], device), 0, args.precision, wrapped)
    if device_type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    audio = 0.0
    for step in range(1, args.ddp_steps + 1):
        batch = batches[(rank + step) % 2]
        audio += float(batch.lengths.sum()) / SAMPLE_RATE
        train_step(task, optimizer, scheduler, to_device(batch, device), step, args.precision, wrapped)
    if device_type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    flat = torch.cat([p.detach().float().flatten() for p in task_module.parameters()])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    difference = (flat - reference).abs().max()
    torch.distributed.all_reduce(difference, op=torch.distributed.ReduceOp.MAX)
    return {"audio_s_per_gpu_s": audio / wall, "max_weight_difference": float(difference)}


def ddp_smoke(args, device_type: str) -> dict:
    """Two DDP processes train ``args.ddp_steps`` steps on different batches; their weights must stay identical."""
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speechlab-ddp-") as folder:
        store_file = str(Path(folder) / "rendezvous")
        torch.multiprocessing.start_processes(
            _ddp_worker, args=(2, store_file, args, device_type, queue), nprocs=2, start_method="spawn"
        )
    result = queue.get()
    return {
        "ddp": "nccl" if device_type == "cuda" else "gloo",
        "world_size": 2,
        "steps": args.ddp_steps,
        "audio_s_per_gpu_s_rank0": result["audio_s_per_gpu_s"],
        "weights_identical_across_ranks": result["max_weight_difference"] == 0.0,
        "max_weight_difference": result["max_weight_difference"],
        "wall_s_including_start": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="base", help="encoder preset (default base)"
    )
    parser.add_argument(
        "--width", type=int, default=None, help="shrink: hidden size (heads = width / 64, FFN 4x)"
    )
    parser.add_argument("--layers", type=int, default=None, help="shrink: number of Transformer layers")
    parser.add_argument("--batch", type=int, default=16, help="utterances per step (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="longest utterance, seconds (default 10)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--attention-dropout", type=float, default=0.0, help="default 0: see the module docstring"
    )
    parser.add_argument("--layerdrop", type=float, default=0.0, help="default 0 (steps of equal work)")
    parser.add_argument("--backends", default="sdpa,flex", help="comma list of: sdpa, flex")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per backend (default 3)")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per round and backend (default 10)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, backends in rotating order (default 3)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    parser.add_argument("--ddp", choices=("auto", "on", "off"), default="auto", help="auto: when >= 2 GPUs")
    parser.add_argument(
        "--ddp-steps", type=int, default=5, help="timed steps of the DDP smoke run (default 5)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="append every record as a JSON line to this file"
    )
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"sdpa", "flex"}
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; choose from sdpa, flex")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu for a smoke run")
    records = run_benchmark(args)
    if args.json:
        with args.json.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
