"""What ``find_unused_parameters=True`` costs a DDP training step (2 CPU processes, gloo).

``speechlab.train.resolve_strategy`` turns ``strategy: ddp`` into ``DDPStrategy(find_unused_parameters=True)`` for
every task that may leave parameters without a gradient (LayerDrop, UniSpeech ranks without labeled speech, the
codec GAN). The search walks the autograd graph once per step. This script times the same training step of an
SSL encoder + linear CTC-style head, wrapped in ``DistributedDataParallel`` with and without the search (LayerDrop 0,
so both are valid), alternating the two modes round by round, and prints the median step time of each and their
ratio. On a GPU the graph walk is the same host work while the step itself is far shorter, so the relative cost
there is larger than on a CPU: measure it there with the same script (``--device cuda``, NCCL).

Usage: ``python benchmarks/ddp_find_unused.py [--preset wavlm_tiny|wavlm_base] [--steps 10] [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechlab.models.ssl_encoder import SSLEncoder  # noqa: E402
from speechlab.models.wavlm import wavlm_base, wavlm_tiny  # noqa: E402

PRESETS = {"wavlm_tiny": wavlm_tiny, "wavlm_base": wavlm_base}


class EncoderWithHead(nn.Module):
    def __init__(self, preset: str, classes: int = 40):
        super().__init__()
        config = PRESETS[preset]()
        config.layerdrop = 0.0
        self.encoder = SSLEncoder(config)
        self.head = nn.Linear(config.hidden_size, classes)

    def forward(self, audio: torch.Tensor, frame_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # A frame mask keeps the mask embedding in the graph: without one it gets no gradient, and DDP without
        # the search fails at the next step (exactly the case the search exists for).
        hidden = self.encoder(audio, frame_mask=frame_mask).last_hidden_state
        logits = self.head(hidden)
        return F.cross_entropy(logits.flatten(0, 1), targets[:, : logits.shape[1]].flatten())


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = EncoderWithHead(args.preset).train()
    models = {False: model, True: copy.deepcopy(model)}  # one DDP wrapper per module: each hooks its params
    generator = torch.Generator().manual_seed(rank)
    audio = torch.randn(args.batch, int(args.seconds * 16000), generator=generator) * 0.1
    targets = torch.randint(0, 40, (args.batch, int(args.seconds * 50)), generator=generator)
    frames = int(model.encoder.frame_lengths(torch.tensor([audio.shape[1]]))[0])
    frame_mask = torch.rand(args.batch, frames, generator=generator) < 0.3
    wrapped = {mode: DistributedDataParallel(m, find_unused_parameters=mode) for mode, m in models.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(args.warmup + args.steps):
        for mode in (False, True) if step % 2 == 0 else (True, False):  # alternate which mode goes first
            models[mode].zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            wrapped[mode](audio, frame_mask, targets).backward()
            dist.barrier()
            if step >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    if rank == 0:
        plain, search = statistics.median(times[False]), statistics.median(times[True])
        record = {
            "preset": args.preset,
            "batch": args.batch,
            "seconds": args.seconds,
            "threads_per_rank": args.threads,
            "median_step_s_find_unused_false": plain,
            "median_step_s_find_unused_true": search,
            "cost_ratio": search / plain,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_1m": os.getloadavg()[0],
        }
        Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="wavlm_tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="utterances per rank")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per utterance")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddp_find_unused_{os.getpid()}.json"
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(args, port, str(out)), nprocs=2, join=True)
    record = json.loads(out.read_text())
    out.unlink()
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
