"""UniSpeechTask: loss parts and their normalisation on real espeak speech, CTC only on labeled utterances."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from speechlab.audio import load_audio
from speechlab.data.collate import collate
from speechlab.data.text import PhonemeTokenizer
from speechlab.nn.gumbel_quantizer import gumbel_temperature
from speechlab.optim import OptimConfig
from speechlab.tasks.unispeech import UniSpeechTask

ESPEAK = Path(__file__).resolve().parents[1] / "data" / "espeak"
QUIET = {"dropout": 0.0, "attention_dropout": 0.0, "feature_dropout": 0.0, "mask_length": 5}


def _items() -> list[dict]:
    rows = [json.loads(line) for line in (ESPEAK / "manifest.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["language"] == "en"][:2] + [r for r in rows if r["language"] == "sw"][:2]
    return picked


@pytest.fixture(scope="module")
def batch_and_tokenizer():
    items = _items()
    tokenizer = PhonemeTokenizer.build([it["phonemes"] for it in _items()])
    loaded = []
    for it in items:
        audio = load_audio(ESPEAK / it["audio"])[:24000]  # 1.5 s keeps the test fast
        # phones of the first 1.5 s are unknown: keep a prefix short enough for CTC to be feasible
        phones = it["phonemes"].split()[:12]
        loaded.append(
            {
                "id": it["id"],
                "audio": audio,
                "targets": tokenizer.encode(" ".join(phones)),
                "language": it["language"],
            }
        )
    return collate(loaded), tokenizer


def _task(tokenizer, **kwargs) -> UniSpeechTask:
    torch.manual_seed(0)
    return UniSpeechTask(
        model="unispeech_tiny",
        model_overrides={"quantizer_dropout": 0.0, "final_dropout": 0.0},
        encoder_overrides=QUIET,
        num_ctc_classes=tokenizer.vocab_size,
        num_negatives=20,
        labeled_languages=["en"],
        **kwargs,
    )


def _train(task: UniSpeechTask, batch, steps: int, lr: float = 3e-3) -> dict[str, list[float]]:
    optimizer = torch.optim.Adam(task.parameters(), lr=lr)
    history: dict[str, list[float]] = {}
    for step in range(steps):
        task.model.set_step(step)
        parts = task.compute_losses(batch, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        for name in ("loss", "ctc", "contrastive", "diversity"):
            history.setdefault(name, []).append(parts[name].item())
    return history


def _assert_decreases(history: dict[str, list[float]], names: tuple[str, ...]) -> None:
    for name in names:
        values = history[name]
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < 0.9 * first, f"{name} did not decrease: {first:.4f} -> {last:.4f}"


def test_unispeech_objective_decreases_total_ctc_and_diversity_losses_on_a_real_batch(batch_and_tokenizer):
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer, ctc_weight=0.5).train()
    assert task.config.swap_prob == 0.5
    _assert_decreases(_train(task, batch, steps=35), ("loss", "ctc", "diversity"))


def test_contrastive_and_diversity_losses_decrease_when_pretraining_self_supervised(batch_and_tokenizer):
    # With alpha = 0.5 on this 4-utterance batch CTC dominates the first hundred steps (the contrastive loss stays
    # at chance, log(K + 1), until CTC has converged), so the contrastive part is checked on its own objective.
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer, ctc_weight=0.0).train()
    _assert_decreases(_train(task, batch, steps=45), ("loss", "contrastive", "diversity"))


def test_ctc_uses_only_labeled_languages(batch_and_tokenizer):
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer).eval()
    assert task.labeled_mask(batch).tolist() == [True, True, False, False]
    parts = task.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    # changing the unlabeled utterances' targets changes nothing
    other = batch.targets.clone()
    other[2:, :3] = 1
    changed = type(batch)(**{**batch.__dict__, "targets": other})
    again = task.compute_losses(changed, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["loss"], parts["loss"])
    assert parts["num_labeled"].item() == 2


def test_loss_is_normalised_by_masked_frames_as_in_the_reference(batch_and_tokenizer):
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer, ctc_weight=0.5, diversity_weight=0.1).eval()
    parts = task.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    masked = parts["num_masked"].item()
    tokens = batch.target_lengths[:2].sum().item()
    expected = 0.5 * parts["ctc"] * tokens / masked + 0.5 * (parts["contrastive"] + 0.1 * parts["diversity"])
    torch.testing.assert_close(parts["loss"], expected)
    contrastive_only = _task(tokenizer, ctc_weight=0.0).eval()
    parts = contrastive_only.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    assert parts["num_labeled"].item() == 0
    torch.testing.assert_close(parts["loss"], parts["contrastive"] + 0.1 * parts["diversity"])


def test_gumbel_temperature_follows_global_step_in_lightning_fit(batch_and_tokenizer, tmp_path):
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer, optim=OptimConfig(lr=1e-3, warmup_steps=0, total_steps=3))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)  # yields the prepared Batch as is
    trainer.fit(task, train_dataloaders=loader)
    expected = gumbel_temperature(2, *task.config.temperature)
    assert task.model.quantizer.temperature == pytest.approx(expected)
    assert trainer.callback_metrics["train/ctc"] > 0
    assert "train/code_perplexity" in trainer.callback_metrics


def test_validation_per_decodes_the_unmasked_input(batch_and_tokenizer, monkeypatch):
    """val/per decodes an eval pass without a span mask; only the contrastive val loss sees masked frames."""
    import speechlab.tasks.unispeech as unispeech_task

    batch, tokenizer = batch_and_tokenizer
    # a high mask probability makes masked and unmasked logits clearly different
    task = _task(tokenizer, mask_prob=0.65, ctc_weight=0.5)
    task.tokenizer = tokenizer
    task.eval()
    frame_masks, decoded = [], []
    forward, decode = task.model.forward, unispeech_task.ctc_greedy_decode

    def recording_forward(*args, **kwargs):
        frame_masks.append(kwargs.get("frame_mask"))
        return forward(*args, **kwargs)

    def recording_decode(logits, frame_lengths, blank_id=0):
        decoded.append(logits.detach().clone())
        return decode(logits, frame_lengths, blank_id)

    monkeypatch.setattr(task.model, "forward", recording_forward)
    monkeypatch.setattr(unispeech_task, "ctc_greedy_decode", recording_decode)
    task.on_validation_epoch_start()
    with torch.no_grad():
        task.validation_step(batch, 0)
        unmasked = forward(batch.audio, batch.lengths).ctc_logits
        masked = forward(batch.audio, batch.lengths, frame_mask=frame_masks[0]).ctc_logits

    assert frame_masks[0] is not None and bool(frame_masks[0].any())  # the contrastive loss is masked ...
    assert len(frame_masks) == 2 and frame_masks[1] is None  # ... the PER pass is not
    labeled = task.labeled_mask(batch)
    assert len(decoded) == 1
    torch.testing.assert_close(decoded[0], unmasked[labeled])
    assert not torch.allclose(decoded[0], masked[labeled], atol=1e-3)
    assert task._error_counts[1] > 0  # phones were counted for val/per


def _fbank_task(tokenizer, **kwargs) -> UniSpeechTask:
    torch.manual_seed(0)
    return UniSpeechTask(
        model="unispeech_fbank_tiny",
        model_overrides={"quantizer_dropout": 0.0, "final_dropout": 0.0},
        encoder_overrides={"dropout": 0.0, "feature_dropout": 0.0},
        num_ctc_classes=tokenizer.vocab_size,
        num_negatives=20,
        labeled_languages=["en"],
        **kwargs,
    )


def test_fbank_variant_decreases_total_and_ctc_losses_on_a_real_batch(batch_and_tokenizer):
    batch, tokenizer = batch_and_tokenizer
    task = _fbank_task(tokenizer, ctc_weight=0.5).train()
    assert task.config.swap_prob == 0.5 and task.config.span_mask_args() == (0.5, 5)
    # as for unispeech_tiny, CTC dominates the first steps on this 4-utterance batch (contrastive stays near chance)
    _assert_decreases(_train(task, batch, steps=30, lr=2e-3), ("loss", "ctc"))


def test_fbank_variant_validation_per_decodes_the_unmasked_input(batch_and_tokenizer, monkeypatch):
    batch, tokenizer = batch_and_tokenizer
    task = _fbank_task(tokenizer, ctc_weight=0.5)
    task.tokenizer = tokenizer
    task.eval()
    frame_masks = []
    forward = task.model.forward

    def recording_forward(*args, **kwargs):
        frame_masks.append(kwargs.get("frame_mask"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(task.model, "forward", recording_forward)
    task.on_validation_epoch_start()
    with torch.no_grad():
        task.validation_step(batch, 0)
    assert len(frame_masks) == 2 and bool(frame_masks[0].any()) and frame_masks[1] is None
    assert task._error_counts[1] > 0


def test_per_term_normalisation_divides_ctc_by_phones_and_contrastive_by_masked_frames(batch_and_tokenizer):
    batch, tokenizer = batch_and_tokenizer
    task = _fbank_task(tokenizer, ctc_weight=0.5, diversity_weight=0.1, loss_normalization="per_term").eval()
    parts = task.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * parts["ctc"] + 0.5 * (parts["contrastive"] + 0.1 * parts["diversity"])
    torch.testing.assert_close(parts["loss"], expected)
    with pytest.raises(ValueError, match="loss_normalization"):
        _fbank_task(tokenizer, loss_normalization="per_frame")


def test_fbank_variant_refuses_hugging_face_init_in_one_line(batch_and_tokenizer, tmp_path):
    from speechlab.checkpoints.safe_load import CheckpointError

    batch, tokenizer = batch_and_tokenizer
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unispeech"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cannot initialise the fbank Conformer"):
        _fbank_task(tokenizer, init_from=str(tmp_path))


def test_labeled_mask_prob_masks_labeled_utterances_apart(batch_and_tokenizer, monkeypatch):
    batch, tokenizer = batch_and_tokenizer
    task = _task(tokenizer, mask_prob=0.65, labeled_mask_prob=0.0).train()
    frame_masks = []
    forward = task.model.forward

    def recording_forward(*args, **kwargs):
        frame_masks.append(kwargs.get("frame_mask"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(task.model, "forward", recording_forward)
    task.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    labeled = task.labeled_mask(batch)
    assert not frame_masks[0][labeled].any()  # the CTC input of labeled utterances is unmasked here
    assert frame_masks[0][~labeled].float().mean() > 0.3  # the unlabeled ones keep the contrastive mask
    with pytest.raises(ValueError, match="labeled_mask_prob"):
        _task(tokenizer, labeled_mask_prob=1.5)
