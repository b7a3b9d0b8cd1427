import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speechlab.augment.mixing import MixingConfig
from speechlab.cli import main
from speechlab.data.collate import UNIT_PAD, collate
from speechlab.data.dataset import AudioDataset
from speechlab.data.manifest import read_manifest
from speechlab.models.wavlm import UnitPredictionHead
from speechlab.nn.kmeans import KMeans, KMeansConfig
from speechlab.nn.masking import span_mask
from speechlab.tasks.units import load_item_audio, mfcc_frame_features
from speechlab.tasks.wavlm_pretrain import (
    WavLMPretrainTask,
    align_units,
    load_pretrained_encoder,
    prediction_metrics,
    upgrade_wavlm_pretrain_state,
)

DATA = Path(__file__).resolve().parents[1] / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def _real_batch(num_items=4, seconds=1.5, num_clusters=12):
    """A padded batch of bundled espeak speech with MFCC k-means units computed here."""
    items = read_manifest(DATA / "espeak" / "manifest.jsonl")[:num_items]
    feats = [mfcc_frame_features(load_item_audio(it)) for it in items]
    km = KMeans(KMeansConfig(num_clusters=num_clusters, max_iter=20)).fit(torch.cat(feats))
    for item, f in zip(items, feats, strict=True):
        item["units"] = " ".join(map(str, km.predict(f).tolist()))
    dataset = AudioDataset(items, units_field="units", max_seconds=seconds)
    return collate([dataset[i] for i in range(len(items))])


def _assert_loss_falls(task: WavLMPretrainTask, batch, lr: float, steps: int) -> None:
    """Train ``task`` on ``batch`` (mixed anew each step, two fixed masks in turn); the loss must fall by 0.1."""
    task.setup("fit")
    task.train()
    optimizer = torch.optim.AdamW(task.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        audio, lengths = task.mixer(batch.audio, batch.lengths)
        results = task.compute_loss(
            audio, lengths, batch.units, generator=torch.Generator().manual_seed(step % 2)
        )
        optimizer.zero_grad()
        results["loss"].backward()
        optimizer.step()
        losses.append(results["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_prediction_metrics_count_masked_and_unmasked_frames_separately():
    # 1 x 6 frames, 3 classes; targets with one padded frame
    targets = torch.tensor([[0, 1, 2, 0, 1, UNIT_PAD]])
    predicted = torch.tensor([[0, 1, 0, 2, 1, 1]])
    logits = F.one_hot(predicted, 3).float()
    frame_mask = torch.tensor([[True, True, True, False, False, True]])
    metrics = prediction_metrics(logits, targets, frame_mask)
    # masked & valid: frames 0,1,2 -> 2 correct of 3; unmasked: frames 3,4 -> 1 of 2; frame 5 is padding
    assert metrics["n_masked"] == 3 and metrics["n_unmasked"] == 2
    assert metrics["acc_masked"].item() == pytest.approx(2 / 3)
    assert metrics["acc_unmasked"].item() == pytest.approx(1 / 2)
    assert math.isnan(prediction_metrics(logits, targets, torch.zeros_like(frame_mask))["acc_masked"].item())


def test_align_units_crops_pads_and_blanks_padded_frames():
    units = torch.tensor([[1, 2, 3, 4, 5], [6, 7, UNIT_PAD, UNIT_PAD, UNIT_PAD]])
    aligned = align_units(units, 4, torch.tensor([4, 3]))
    assert aligned.tolist() == [[1, 2, 3, 4], [6, 7, UNIT_PAD, UNIT_PAD]]
    longer = align_units(units, 7, torch.tensor([7, 2]))
    assert longer.tolist() == [[1, 2, 3, 4, 5, UNIT_PAD, UNIT_PAD], [6, 7] + [UNIT_PAD] * 5]


def test_align_units_with_a_stride_takes_every_kth_unit_for_a_slower_encoder():
    units = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, UNIT_PAD, UNIT_PAD, UNIT_PAD]])
    # a 25 Hz encoder over 50 Hz units: frame t <- unit 2t (fairseq HuBERT's label_rate handling)
    aligned = align_units(units, 4, torch.tensor([4, 2]), stride=2)
    assert aligned.tolist() == [[1, 3, 5, 7], [8, 10, UNIT_PAD, UNIT_PAD]]


def test_fbank_conformer_pretraining_targets_every_second_unit_and_learns_on_a_real_batch():
    """The mini recipe's WavLM-style pretraining of the fbank Conformer (25 Hz) on 50 Hz MFCC units."""
    torch.manual_seed(0)
    batch = _real_batch(num_items=4, seconds=1.5)
    small = {"hidden_size": 32, "ffn_size": 64, "num_heads": 2, "num_layers": 2}
    task = WavLMPretrainTask(
        encoder="fbank_conformer_tiny",
        encoder_overrides=small,
        num_classes=12,
        final_dim=16,
        mask_prob=0.5,
        mask_length=3,
        pred_nomask_weight=1.0,
        feature_penalty_weight=0.0,
        mixing=MixingConfig(mix_prob=0.5, noise_manifest=str(DATA / "noise_opensfx" / "manifest.jsonl")),
    )
    assert task.units_stride == 2 and (task.mask_prob, task.mask_length) == (0.5, 3)
    frames = task.encoder.frame_lengths(batch.lengths)
    expected = align_units(batch.units[:, ::2], task.encoder.num_frames(batch.audio.shape[1]), frames)
    got = align_units(batch.units, task.encoder.num_frames(batch.audio.shape[1]), frames, task.units_stride)
    assert torch.equal(got, expected) and (got != UNIT_PAD).sum() == frames.sum()
    _assert_loss_falls(task, batch, lr=3e-3, steps=15)


def test_units_at_a_rate_the_encoder_hop_is_no_multiple_of_are_a_clear_error():
    with pytest.raises(ValueError, match="units_hop=480"):
        WavLMPretrainTask(encoder="fbank_conformer_tiny", units_hop=480)


def test_fbank_conformer_pretraining_exports_an_encoder_that_loads_and_fine_tunes(tmp_path):
    from speechlab.api import load
    from speechlab.models.fbank_conformer import FbankConformerEncoder

    small = {"hidden_size": 32, "ffn_size": 64, "num_heads": 2, "num_layers": 1}
    task = WavLMPretrainTask(
        encoder="fbank_conformer_tiny", encoder_overrides=small, num_classes=12, final_dim=8
    )
    task.export_pretrained(tmp_path / "pretrained")
    loaded = load(tmp_path / "pretrained")
    assert isinstance(loaded, FbankConformerEncoder)
    for key, value in task.encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_head_logits_are_cosine_similarity_over_temperature():
    torch.manual_seed(0)
    head = UnitPredictionHead(hidden_size=8, num_classes=5, final_dim=4, logit_temp=0.1)
    hidden = torch.randn(3, 8)
    logits = head(hidden)
    expected = (
        F.cosine_similarity(head.final_proj(hidden)[:, None, :], head.label_embeddings[None], dim=-1) / 0.1
    )
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 10.0 + 1e-5


def test_loss_is_masked_cross_entropy_plus_the_scaled_feature_penalty():
    torch.manual_seed(0)
    batch = _real_batch(num_items=3, seconds=1.0)
    task = WavLMPretrainTask(num_classes=12, final_dim=16, feature_penalty_weight=10.0).eval()
    with torch.no_grad():
        results = task.compute_loss(
            batch.audio, batch.lengths, batch.units, generator=torch.Generator().manual_seed(3)
        )
        # recompute by hand with the same mask
        frame_lengths = task.encoder.frame_lengths(batch.lengths)
        num_frames = int(frame_lengths.max())
        frame_mask = span_mask(
            frame_lengths,
            task.mask_prob,
            task.mask_length,
            num_frames=num_frames,
            generator=torch.Generator().manual_seed(3),
        )
        out = task.encoder(batch.audio, batch.lengths, frame_mask=frame_mask)
        targets = align_units(batch.units, num_frames, out.frame_lengths)
        logits = task.head(out.last_hidden_state)
        selected = frame_mask & (targets != UNIT_PAD)
        ce = F.cross_entropy(logits[selected], targets[selected])
        metrics = prediction_metrics(logits, targets, frame_mask)
    torch.testing.assert_close(results["loss_masked"], ce)
    torch.testing.assert_close(results["loss"], ce + 10.0 * out.feature_penalty)
    torch.testing.assert_close(results["acc_masked"], metrics["acc_masked"])
    torch.testing.assert_close(results["acc_unmasked"], metrics["acc_unmasked"])
    assert 0.2 < results["masked_fraction"] < 0.7


def test_loss_decreases_over_a_few_steps_on_a_real_batch():
    torch.manual_seed(0)
    batch = _real_batch(num_items=4, seconds=1.5)
    task = WavLMPretrainTask(
        num_classes=12,
        final_dim=32,
        feature_penalty_weight=0.0,
        mixing=MixingConfig(mix_prob=0.5, noise_manifest=str(DATA / "noise_opensfx" / "manifest.jsonl")),
    )
    _assert_loss_falls(task, batch, lr=2e-3, steps=12)


def test_units_beyond_num_classes_are_a_clear_error():
    batch = _real_batch(num_items=2, seconds=0.5, num_clusters=12)
    task = WavLMPretrainTask(num_classes=4, final_dim=8)
    with pytest.raises(ValueError, match="num_classes"):
        task.compute_loss(batch.audio, batch.lengths, batch.units)


def test_lightning_fit_writes_a_checkpoint_whose_encoder_loads_safely(tmp_path):
    from speechlab.checkpoints.encoder_weights import load_encoder_state_dict
    from speechlab.data.datamodule import SpeechDataModule
    from speechlab.optim import OptimConfig
    from speechlab.train import build_trainer

    rows = [json.loads(line) for line in (DATA / "espeak" / "manifest.jsonl").read_text().splitlines()[:6]]
    for row in rows:
        row["audio"] = str(DATA / "espeak" / row["audio"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    units = tmp_path / "units"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(corpus / "manifest.jsonl"),
                "--output-dir",
                str(units),
                "--num-clusters",
                "8",
                "--max-iter",
                "10",
            ]
        )
        == 0
    )
    data = SpeechDataModule(
        train_manifest=str(units / "corpus.jsonl"),
        val_manifest=str(units / "corpus.jsonl"),
        units_field="units",
        max_batch_seconds=6.0,
        max_seconds=1.5,
    )
    task = WavLMPretrainTask(
        num_classes=8,
        final_dim=16,
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        mixing=MixingConfig(
            mix_prob=1.0, noise_prob=0.5, noise_manifest=str(DATA / "noise_opensfx" / "manifest.jsonl")
        ),
    )
    trainer = build_trainer(
        task,
        default_root_dir=str(tmp_path / "exp"),
        max_steps=2,
        limit_val_batches=1,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=data)
    assert task.mixer is not None and task.mixer.num_noise_clips > 0
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert "train/acc_masked" in trainer.callback_metrics
    ckpt = tmp_path / "exp" / "checkpoints" / "last.ckpt"
    encoder = load_pretrained_encoder(ckpt)  # torch.load(weights_only=True) inside
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, task.encoder.state_dict()[name])
    state = load_encoder_state_dict(str(ckpt))  # what CTC fine-tuning (init_from) reads
    assert set(state) == set(encoder.state_dict())
    # k-means iteration 2 on a hidden layer of the trained encoder
    units2 = tmp_path / "units_l2"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(units / "corpus.jsonl"),
                "--output-dir",
                str(units2),
                "--checkpoint",
                str(ckpt),
                "--layer",
                "2",
                "--num-clusters",
                "6",
                "--max-iter",
                "10",
            ]
        )
        == 0
    )
    labelled = read_manifest(units2 / "corpus.jsonl", require=("units",))
    first = read_manifest(units / "corpus.jsonl")
    for it2, it1 in zip(labelled, first, strict=True):
        new_units = [int(u) for u in it2["units"].split()]
        assert len(new_units) == len(it1["units"].split())
        assert max(new_units) < 6
    assert len({u for it in labelled for u in it["units"].split()}) > 1
    # resuming restores the task from the checkpoint's plain hyper-parameters
    restored = WavLMPretrainTask.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.mixing_config == task.mixing_config and restored.optim_config == task.optim_config


def test_micro_batches_of_one_accumulated_update_get_different_mixing_draws(tmp_path):
    # Under gradient accumulation global_step stays put for accumulate_grad_batches micro-batches; each one must
    # still mix with its own draws (seeded per micro-batch), and the same micro-batch must always draw alike.
    from speechlab.data.datamodule import SpeechDataModule
    from speechlab.optim import OptimConfig
    from speechlab.train import build_trainer

    rows = [json.loads(line) for line in (DATA / "espeak" / "manifest.jsonl").read_text().splitlines()[:4]]
    with (tmp_path / "train.jsonl").open("w") as f:
        for row in rows:
            frames = int(row["num_samples"]) // 320
            units = " ".join(str(i % 8) for i in range(frames))
            f.write(json.dumps({**row, "audio": str(DATA / "espeak" / row["audio"]), "units": units}) + "\n")
    noise = str(DATA / "noise_opensfx" / "manifest.jsonl")

    def draws_per_micro_batch() -> list[tuple[int, int, float]]:
        task = WavLMPretrainTask(
            num_classes=8,
            final_dim=16,
            optim=OptimConfig(lr=1e-3, warmup_steps=1),
            mixing=MixingConfig(mix_prob=1.0, noise_prob=0.5, noise_manifest=noise),
        )
        seen: list[tuple[int, int, float]] = []
        original = task._mixing_generator

        def recording(batch_idx: int) -> torch.Generator:
            generator = original(batch_idx)
            state = generator.get_state()
            seen.append((task.trainer.global_step, batch_idx, float(torch.rand(1, generator=generator))))
            generator.set_state(state)
            return generator

        task._mixing_generator = recording
        data = SpeechDataModule(
            train_manifest=str(tmp_path / "train.jsonl"), units_field="units", max_batch_seconds=3.0
        )
        trainer = build_trainer(
            task,
            default_root_dir=str(tmp_path / "exp"),
            max_steps=1,
            accumulate_grad_batches=2,
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
            callbacks=[],
            accelerator="cpu",
        )
        trainer.fit(task, datamodule=data)
        return seen

    first = draws_per_micro_batch()
    assert [(step, idx) for step, idx, _ in first] == [(0, 0), (0, 1)], first
    assert first[0][2] != first[1][2], "two micro-batches of one update mixed with the same draws"
    assert draws_per_micro_batch() == first, "the draws of a micro-batch depend on its position only"


def test_a_checkpoint_of_the_old_layout_loads_everywhere(tmp_path):
    """Checkpoints written before the task held a ``WavLM`` model keep ``encoder.*`` / ``head.*`` at the top: the
    reader behind ``speechlab.load``, ``load_pretrained_encoder`` and a resume (``on_load_checkpoint``) read them."""
    import lightning as L

    import speechlab

    torch.manual_seed(0)
    hparams = {
        "encoder": "wavlm_tiny",
        "encoder_overrides": {"num_layers": 1},
        "num_classes": 8,
        "final_dim": 16,
    }
    task = WavLMPretrainTask(**hparams)
    state = task.state_dict()
    assert {k.split(".")[0] for k in state} == {"model"} and "model.head.label_embeddings" in state
    old_state = {k.removeprefix("model."): v for k, v in state.items()}
    assert upgrade_wavlm_pretrain_state(old_state).keys() == state.keys()
    checkpoint = {
        "state_dict": old_state,
        "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {**hparams, "_class_path": "speechlab.tasks.wavlm_pretrain.WavLMPretrainTask"},
    }
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    del checkpoint["hyper_parameters"]["_class_path"]  # recognised by its parameter names too
    torch.save(checkpoint, tmp_path / "unnamed.ckpt")

    for loaded in (
        load_pretrained_encoder(path),
        speechlab.load(path),
        speechlab.load(tmp_path / "unnamed.ckpt"),
    ):
        for name, value in task.encoder.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value)

    resumed = WavLMPretrainTask(**hparams)
    stored = torch.load(path, weights_only=True)
    resumed.on_load_checkpoint(stored)
    resumed.load_state_dict(stored["state_dict"])  # strict: every key of the new layout, nothing else
    torch.testing.assert_close(resumed.head.label_embeddings, task.head.label_embeddings)
