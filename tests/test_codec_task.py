"""CodecTask: manual GAN optimisation on real audio from data/, EMA generator, distillation, random crops."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from speechlab.audio import load_audio
from speechlab.data.manifest import read_manifest
from speechlab.nn.seanet import in_shared_layer_order
from speechlab.optim import build_optimizer
from speechlab.tasks.codec import (
    CodecLossConfig,
    CodecTask,
    DiscriminatorConfig,
    distillation_loss,
    random_crop,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "ljspeech_en" / "manifest.jsonl"
SMALL_DISC = DiscriminatorConfig(
    stft_n_ffts=(512, 128), stft_filters=8, periods=(2, 3), period_channels=(8, 16, 16)
)


def real_batch(num: int = 4, seconds: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` LJ Speech clips, ``seconds`` long from 1 s in (speech, not leading silence)."""
    items = read_manifest(DATA)[:num]
    clips = [load_audio(it["audio"], 16000, offset=1.0, duration=seconds) for it in items]
    audio = torch.stack(clips)
    return audio, torch.full((num,), audio.shape[1], dtype=torch.long)


@pytest.fixture(autouse=True)
def one_thread():
    """GAN steps on tiny models are dominated by thread sync on a loaded 2-core machine: run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.mel: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mel.append(float(trainer.callback_metrics["train/mel"]))


def fit(task: CodecTask, batch, steps: int, root: Path) -> Recorder:
    recorder = Recorder()
    loader = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        default_root_dir=root,  # on_train_end exports <root>/pretrained
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        limit_val_batches=0,
    )
    trainer.fit(task, loader)
    return recorder


def tiny_task(**kwargs) -> CodecTask:
    defaults = dict(
        codec="codec_tiny",
        discriminator=SMALL_DISC,
        segment_seconds=0.6,
        generator_ema=0.9,
        optim=None,
        loss=CodecLossConfig(),
    )
    defaults.update(kwargs)
    task = CodecTask(**defaults)
    task.optim_config.lr = 3e-3
    return task


def test_gan_steps_on_real_audio_reduce_mel_loss_and_update_both_networks(tmp_path: Path):
    torch.manual_seed(0)
    audio, lengths = real_batch(3, 0.4)
    task = tiny_task(segment_seconds=0.4)
    gen0 = [p.detach().clone() for p in task.codec.parameters()]
    disc0 = [p.detach().clone() for p in task.discriminator.parameters()]
    ema0 = [p.detach().clone() for p in task.codec_ema.parameters()]
    recorder = fit(task, (audio, lengths), steps=24, root=tmp_path)  # 12 batches: D step + G step each
    assert len(recorder.mel) == 12
    first, last = sum(recorder.mel[:3]) / 3, sum(recorder.mel[-3:]) / 3
    assert last < 0.8 * first, recorder.mel
    # the NeMo zero_grad pitfall: the discriminator must really learn too, and the EMA copy must follow
    assert any(not torch.equal(a, b) for a, b in zip(disc0, task.discriminator.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(gen0, task.codec.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema0, task.codec_ema.parameters(), strict=True))
    assert bool(task.codec.quantizer.levels[0].initialized)
    assert torch.equal(task.codec_ema.quantizer.levels[0].embed, task.codec.quantizer.levels[0].embed)


@pytest.mark.parametrize("written_in", ["saved", "shared"])
def test_a_run_written_in_either_transformer_parameter_order_resumes_with_each_moment_on_its_parameter(
    written_in,
):
    # AdamW's saved state is matched to the parameters by position. Runs written before 7d31800 hold it in the
    # latent Transformer's saved order (the order now), runs written while it had the shared layer's order in that.
    torch.manual_seed(0)
    task = tiny_task()
    named = list(task.codec.named_parameters())
    written = named if written_in == "saved" else in_shared_layer_order(named)
    assert [name for name, _ in written] != [name for name, _ in named] or written_in == "saved"
    optimizer = build_optimizer(written, task.optim_config, total_steps=10, fused=False)["optimizer"]
    for p in task.codec.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    moments = {id(p): optimizer.state[p]["exp_avg"].clone() for p in task.codec.parameters()}
    checkpoint = {"optimizer_states": [copy.deepcopy(optimizer.state_dict())], "state_dict": {}}
    task.on_load_checkpoint(checkpoint)
    resumed = build_optimizer(named, task.optim_config, total_steps=10, fused=False)["optimizer"]
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    assert all(torch.equal(resumed.state[p]["exp_avg"], moments[id(p)]) for p in task.codec.parameters())


def test_validation_logs_mel_distance_and_si_sdr_per_n_q():
    torch.manual_seed(0)
    audio, lengths = real_batch(2)
    task = tiny_task(val_n_q=[1])
    loader = DataLoader([(audio, lengths)], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(task, loader, verbose=False)[0]
    for key in ("val/mel_distance", "val/si_sdr", "val/mel_distance_nq1", "val/si_sdr_nq1"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key]))


class ConvTeacher(torch.nn.Module):
    """Stand-in frozen teacher at 100 Hz (a different frame rate on purpose)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, dim, 320, stride=160)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.conv(audio[:, None]).transpose(1, 2)


def _teacher() -> tuple[torch.nn.Module, int]:
    try:
        from speechlab.models.ssl_encoder import SSLEncoder
        from speechlab.models.wavlm import wavlm_tiny

        config = wavlm_tiny()
        return SSLEncoder(config), config.hidden_size
    except ImportError:  # backbone not available: a conv teacher exercises the same path
        return ConvTeacher(), 12


def test_semantic_distillation_reaches_the_encoder_and_leaves_the_teacher_frozen():
    torch.manual_seed(0)
    teacher, dim = _teacher()
    task = tiny_task(teacher=teacher, teacher_dim=dim)
    audio, lengths = real_batch(2, 0.4)
    out = task.codec(audio, lengths)
    recon = out.audio
    total, parts = task.generator_losses(audio, lengths, out, recon, use_gan=False)
    assert "distill" in parts and parts["distill"] > 0
    parts["distill"].backward()
    grad = task.codec.encoder.conv_in.conv.parametrizations.weight.original1.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert "teacher" not in task.hparams


def test_distillation_loss_is_minimal_for_aligned_features_and_resamples_frame_rates():
    teacher = torch.randn(2, 20, 8)
    student = torch.nn.functional.interpolate(teacher.transpose(1, 2), size=10, mode="linear").transpose(1, 2)
    lengths = torch.tensor([10, 6])
    aligned = distillation_loss(student, teacher, lengths)
    opposite = distillation_loss(-student, teacher, lengths)
    assert aligned < opposite
    assert torch.isclose(aligned, -torch.nn.functional.logsigmoid(torch.tensor(1.0)), atol=1e-4)


def test_random_crop_keeps_lengths_and_zero_pads_short_items():
    audio = torch.arange(2 * 10, dtype=torch.float32).view(2, 10) + 1
    lengths = torch.tensor([10, 3])
    crop, crop_lengths = random_crop(audio, lengths, 5, torch.Generator().manual_seed(0))
    assert crop.shape == (2, 5)
    assert crop_lengths.tolist() == [5, 3]
    assert crop[1, :3].tolist() == [11.0, 12.0, 13.0] and crop[1, 3:].abs().sum() == 0
    start = int(crop[0, 0].item()) - 1
    assert crop[0].tolist() == [float(v) for v in range(start + 1, start + 6)]


@pytest.mark.slow
def test_longer_training_improves_held_out_mel_distance(tmp_path: Path):
    from speechlab.nn.spectral import MultiScaleMelLoss

    torch.manual_seed(0)
    audio, lengths = real_batch(4, 1.0)
    held, held_lengths = real_batch(6, 1.0)
    held, held_lengths = held[4:], held_lengths[4:]
    task = tiny_task(segment_seconds=1.0, adversarial_start_step=40)
    mel = MultiScaleMelLoss()

    def score() -> float:
        codec = task.codec_ema.eval()
        codes, frames = codec.encode(held, held_lengths)
        return float(mel(codec.decode(codes, frames)[:, : held.shape[1]], held, held_lengths))

    fit(task, (audio, lengths), steps=2, root=tmp_path)
    before = score()
    fit(task, (audio, lengths), steps=120, root=tmp_path)
    assert score() < before
