"""Optimiser and learning-rate schedule shared by every task (one place, one config schema)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from speechlab.host_sync import host_reads_are_free


@dataclass
class OptimConfig:
    """AdamW with linear warm-up followed by a decay.

    ``total_steps=None`` means "the trainer's estimated number of optimiser steps" (filled in by the task).
    """

    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    decay: Literal["linear", "cosine", "constant"] = "linear"
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(
                f"optim.lr must be > 0, got {self.lr}: set a positive learning rate such as 5e-4"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.decay must be 'linear', 'cosine' or 'constant', got {self.decay!r}")


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.decay == "constant":
        return 1.0
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def _param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    config: OptimConfig,
    lr_scale: dict[str, float] | None = None,
) -> list[dict]:
    """AdamW's parameter groups: (decay, no decay) x learning-rate scale, each in ``named_parameters``' order."""
    decay, no_decay = {}, {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        scale = 1.0
        for prefix, value in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = value
        target = no_decay if param.ndim <= 1 else decay
        target.setdefault(scale, []).append(param)
    return [
        {"params": params, "weight_decay": wd, "lr": config.lr * scale}
        for bucket, wd in ((decay, config.weight_decay), (no_decay, 0.0))
        for scale, params in bucket.items()
    ]


def optimizer_order(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    config: OptimConfig,
    lr_scale: dict[str, float] | None = None,
) -> list[torch.nn.Parameter]:
    """The parameters in the order :func:`build_optimizer`'s optimiser holds them: its ``state_dict`` numbers
    them 0, 1, ... in this order, which is how a resumed run matches saved moments to parameters."""
    return [p for group in _param_groups(named_parameters, config, lr_scale) for p in group["params"]]


def reorder_optimizer_state(
    state: dict, written: list[torch.nn.Parameter], current: list[torch.nn.Parameter]
) -> dict | None:
    """An optimiser ``state_dict`` numbered in the order ``written``, renumbered for the same parameters in the
    order ``current`` (both as :func:`optimizer_order` gives them, same groups). None when the saved moments do not
    tell: they already fit ``current`` by shape (or fit neither order)."""

    def fits(order: list[torch.nn.Parameter]) -> bool:
        return len(order) == sum(len(g["params"]) for g in state["param_groups"]) and all(
            tuple(moment.shape) == tuple(order[index].shape)
            for index, values in state["state"].items()
            for moment in values.values()
            if isinstance(moment, torch.Tensor) and moment.dim() > 0
        )

    if fits(current) or not fits(written):
        return None
    position = {id(p): i for i, p in enumerate(current)}
    renumber = {i: position[id(p)] for i, p in enumerate(written)}
    return {
        "state": {renumber[i]: values for i, values in state["state"].items()},
        "param_groups": [
            {**group, "params": sorted(renumber[i] for i in group["params"])}
            for group in state["param_groups"]
        ],
    }


def build_optimizer(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    config: OptimConfig,
    total_steps: int,
    lr_scale: dict[str, float] | None = None,
    fused: bool | None = None,
) -> dict:
    """Build AdamW + the warm-up/decay schedule in Lightning's ``configure_optimizers`` format.

    Biases and normalisation weights (1-D parameters) get no weight decay. ``lr_scale`` maps a parameter name
    prefix to a learning-rate multiplier (e.g. layer-wise decay for fine-tuning).
    """
    groups = _param_groups(named_parameters, config, lr_scale)
    # Fused (``fused=None``: when every parameter is on CUDA, or on the CPU under ``host_sync.device_path()``): one
    # kernel per step, and it can skip a non-finite update on the device (``found_inf``, see SpeechTask), so the
    # training step needs no host read for that check.
    if fused is None:
        params = [p for group in groups for p in group["params"]]
        fused = bool(params) and all(
            p.is_cuda or (p.device.type == "cpu" and not host_reads_are_free(p)) for p in params
        )
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )
    total = config.total_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
