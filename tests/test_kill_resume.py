"""Real ``speechlab fit`` runs killed (SIGKILL, also mid checkpoint write) or stopped (SIGTERM) and resumed.

Each test runs an uninterrupted reference and an interrupted run of the same config side by side, resumes the
interrupted one with ``--ckpt_path last`` until it finishes, and checks: every ``last.ckpt`` left by a kill loads
(``weights_only``), each attempt resumes right after its checkpoint's step, the steps that reached the final
weights are 1..N exactly once with the same batches as the reference, and on CPU the final weights and optimiser
state equal the reference's bit for bit. The subprocess runs take minutes on a shared CPU, hence ``slow``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kill_harness as kh
import pytest
import torch

TIMEOUT = 900  # seconds per subprocess run: generous, the CPU is shared


@dataclass
class Family:
    """A task family's tiny config: model section, data section (built in a folder) and run length."""

    name: str
    model: str
    data: Callable[[Path], str]
    max_steps: int
    trainer: dict[str, Any] | None = None  # more trainer settings


def _ctc_data(folder: Path) -> str:
    # 8 utterances of ~1.3 s, 3 s per batch -> 2 per batch, 4 batches per epoch: 10 steps cross two epoch ends.
    return kh.ctc_data(kh.tiny_manifest(folder / "train.jsonl", 8))


CTC = Family("ctc", kh.CTC_MODEL, _ctc_data, max_steps=10)

# The mini recipe's stage-2 shape: the fbank + Conformer encoder (BatchNorm statistics, its own dropout), and a
# validation run every 3 steps (mid-epoch: 4 batches an epoch), so a resume restarts between validations.
CTC_FBANK_VALIDATED = Family(
    "ctc_fbank_validated",
    kh.CTC_MODEL.replace(
        "encoder: wavlm_tiny\n    encoder_overrides: {layerdrop: 0.0, num_layers: 1, dropout: 0.1}",
        "encoder: fbank_conformer_tiny\n    encoder_overrides: {num_layers: 1, hidden_size: 48, ffn_size: 96}",
    ),
    lambda folder: kh.ctc_data(
        kh.tiny_manifest(folder / "train.jsonl", 8), kh.tiny_manifest(folder / "val.jsonl", 4)
    ),
    max_steps=10,
    trainer={"val_check_interval": 3, "check_val_every_n_epoch": None},
)
assert "fbank_conformer_tiny" in CTC_FBANK_VALIDATED.model, "kh.CTC_MODEL's encoder lines changed"


def _wavlm_model(mixing: bool) -> str:
    noise = kh.REPO / "data/noise_opensfx/manifest.jsonl"
    mix = f"    mixing: {{mix_prob: 1.0, noise_prob: 0.5, noise_manifest: {noise}}}\n" if mixing else ""
    return f"""model:
  class_path: speechlab.tasks.wavlm_pretrain.WavLMPretrainTask
  init_args:
    encoder: wavlm_tiny
    encoder_overrides: {{layerdrop: 0.0, num_layers: 1, dropout: 0.1}}
    num_classes: 8
    final_dim: 16
    mask_prob: 0.5
    mask_length: 2
{mix}    optim: {{lr: 3.0e-3, warmup_steps: 2}}
"""


def _wavlm_data(folder: Path) -> str:
    return f"""data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {kh.tiny_manifest(folder / "train.jsonl", 8, units=8)}
    units_field: units
    max_batch_seconds: 3.0
"""


# Masking, dropout and the data order only; then the same with utterance mixing (noise / second speaker).
WAVLM = Family("wavlm", _wavlm_model(mixing=False), _wavlm_data, max_steps=8)
WAVLM_MIXING = Family("wavlm_mixing", _wavlm_model(mixing=True), _wavlm_data, max_steps=8)

UNISPEECH = Family(
    "unispeech",
    """model:
  class_path: speechlab.tasks.unispeech.UniSpeechTask
  init_args:
    model: unispeech_tiny
    model_overrides: {swap_prob: 0.5}
    num_negatives: 10
    labeled_languages: [en]
    optim: {lr: 3.0e-3, warmup_steps: 2}
""",
    # 4 labeled English + 4 unlabeled Swahili utterances.
    lambda folder: kh.ctc_data(kh.tiny_manifest(folder / "train.jsonl", 4, languages=("en", "sw"))),
    max_steps=8,
)

CODEC = Family(
    "codec",
    """model:
  class_path: speechlab.tasks.codec.CodecTask
  init_args:
    codec: codec_tiny
    segment_seconds: 0.5
    generator_ema: 0.9
    adversarial_start_step: 2
    optim: {lr: 2.0e-3, betas: [0.8, 0.99], weight_decay: 0.0, warmup_steps: 2, decay: constant}
    discriminator: {stft_n_ffts: [256], stft_filters: 4, periods: [2, 3], period_channels: [4, 8]}
""",
    lambda folder: (
        f"""data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {kh.tiny_manifest(folder / "train.jsonl", 8)}
    max_batch_seconds: 3.0
"""
    ),
    # 2 warm-up batches of one (generator) step, then 2 steps a batch: 6 batches, across an epoch end.
    max_steps=10,
)


def _config(family: Family, root: Path, slow_write: float = 0.0) -> Path:
    return kh.write_config(
        root.parent / f"{root.name}.yaml",
        root,
        model=family.model,
        data=family.data(root.parent),
        max_steps=family.max_steps,
        trainer_extra=family.trainer,
        recorder={"slow_checkpoint_write": slow_write},
    )


def assert_same_tensors(expected: Any, actual: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors are equal (tensors bitwise)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.shape == actual.shape, where
        assert torch.equal(expected, actual), f"{where}: max diff {(expected - actual).abs().max()}"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same_tensors(e, a, f"{where}[{i}]")


def _trained_state(path: Path) -> dict:
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    checkpoint = load_torch_checkpoint(path)
    return {"state_dict": checkpoint["state_dict"], "optimizer_states": checkpoint["optimizer_states"]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _all_checkpoints_load(folder: Path) -> None:
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    for path in folder.glob("*.ckpt"):
        assert "global_step" in load_torch_checkpoint(path), path


def _interrupt(run: kh.FitRun, steps: Path, how: str, step: int, rng: random.Random) -> None:
    """Interrupt ``run`` after it logged ``step``: 'kill' (SIGKILL after a random delay), 'write' (SIGKILL
    while a checkpoint temp file exists) or 'term' (SIGTERM, then it must exit by itself)."""
    assert run.wait_for_step(step, steps, TIMEOUT), f"run ended before step {step}:\n{run.output[-3000:]}"
    if how == "kill":
        time.sleep(rng.uniform(0.0, 0.5))
        run.send(kh.SIGKILL)
    elif how == "write":
        assert run.wait_for_temp_checkpoint(TIMEOUT) is not None, run.output[-3000:]
        run.send(kh.SIGKILL)
    else:
        run.send(kh.SIGTERM)


def run_with_interruptions(
    family: Family,
    folder: Path,
    plan: list[tuple[str, int]],
    extra_args: list[str] | None = None,
    seed: int = 0,
) -> tuple[Path, list[int], list[int]]:
    """Run ``family`` interrupted per ``plan`` ([(how, after step)]), resuming each time, until it finishes.

    Returns the run folder, the step each resume started from, and each interrupted attempt's last logged step.
    """
    rng = random.Random(seed)
    root = folder / "interrupted"
    config = _config(family, root, slow_write=0.3)
    steps = root / "steps.jsonl"
    args = extra_args if extra_args is not None else ["--checkpoint_every_n_steps", "1"]
    resumed_from, reached = [], []
    for attempt, (how, step) in enumerate(plan):
        run = kh.FitRun(config, root, ckpt_path="last" if attempt else None, extra_args=args).start(attempt)
        _interrupt(run, steps, how, step, rng)
        code = run.wait(TIMEOUT)
        if how == "term":
            assert code == 128 + kh.SIGTERM, (
                f"SIGTERM: expected exit status 143 after saving, got {code}:\n{run.output[-3000:]}"
            )
        else:
            assert code == -9, f"expected the SIGKILL to end the run, got exit code {code}"
        reached.append(run.steps(steps)[-1]["step"])
        _all_checkpoints_load(root / "checkpoints")
        resumed_from.append(kh.checkpoint_step(root / "checkpoints/last.ckpt"))
    final = kh.FitRun(config, root, ckpt_path="last", extra_args=args).start(len(plan))
    assert final.wait(TIMEOUT) == 0, final.output[-3000:]
    return root, resumed_from, reached


def _reference(family: Family, folder: Path) -> kh.FitRun:
    root = folder / "reference"
    return kh.FitRun(_config(family, root), root).start(0)


def _check_against_reference(
    family: Family, reference: kh.FitRun, root: Path, resumed_from: list[int]
) -> None:
    assert reference.wait(TIMEOUT) == 0, reference.output[-3000:]
    expected = kh.committed_history(kh.read_steps(reference.root / "steps.jsonl"), [])
    history = kh.committed_history(kh.read_steps(root / "steps.jsonl"), resumed_from)
    assert max(expected) == family.max_steps
    assert history == expected, "a resumed run trained other batches than the uninterrupted one"
    assert_same_tensors(
        _trained_state(reference.root / "checkpoints/last.ckpt"),
        _trained_state(root / "checkpoints/last.ckpt"),
    )


@pytest.mark.slow
def test_ctc_run_killed_repeatedly_finishes_with_the_uninterrupted_weights(tmp_path):
    reference = _reference(CTC, tmp_path)
    # Kills mid-epoch, during a checkpoint write, and right at an epoch end (step 8 of 4-batch epochs).
    plan = [("kill", 2), ("write", 5), ("kill", 8)]
    root, resumed_from, reached = run_with_interruptions(CTC, tmp_path, plan)
    assert all(r - 1 <= start <= r for start, r in zip(resumed_from, reached, strict=True)), (
        resumed_from,
        reached,
    )
    _check_against_reference(CTC, reference, root, resumed_from)
    leftovers = sorted(p.name for p in (root / "checkpoints").glob("*.tmp"))
    assert not leftovers, f"temp files of killed writes must be cleaned up by the next write: {leftovers}"
    mode = (root / "checkpoints/last.ckpt").stat().st_mode & 0o777
    assert mode & 0o044 == 0o644 & ~_umask() & 0o044, f"last.ckpt mode {mode:o} ignores the umask"


@pytest.mark.slow
def test_ctc_sigterm_saves_the_current_step_and_resumes_exactly(tmp_path):
    reference = _reference(CTC, tmp_path)
    # No periodic checkpoints: the only checkpoint before the end is the one SIGTERM writes.
    root, resumed_from, reached = run_with_interruptions(
        CTC, tmp_path, [("term", 3)], extra_args=["--checkpoint_every_n_steps", "1000"]
    )
    assert resumed_from == reached, "SIGTERM must checkpoint the step it stopped at"
    _check_against_reference(CTC, reference, root, resumed_from)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    [
        WAVLM,
        WAVLM_MIXING,
        UNISPEECH,
        CODEC,
        CTC_FBANK_VALIDATED,
    ],
    ids=lambda f: f.name,
)
def test_every_task_family_resumes_exactly_after_kills(tmp_path, family):
    reference = _reference(family, tmp_path)
    root, resumed_from, _ = run_with_interruptions(family, tmp_path, [("write", 2), ("kill", 5)])
    _check_against_reference(family, reference, root, resumed_from)
