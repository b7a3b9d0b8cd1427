"""Fine-tuning from pretrained checkpoints: Hugging Face directories and speechlab Lightning checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers

from speechlab.data.datamodule import SpeechDataModule
from speechlab.tasks.ctc import CTCTask
from speechlab.train import build_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    items = [json.loads(line) for line in (REPO / "data/espeak/manifest.jsonl").open(encoding="utf-8")]
    english = sorted((it for it in items if it["language"] == "en"), key=lambda it: it["duration"])[:4]
    path = tmp_path_factory.mktemp("ft") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({**it, "audio": str(REPO / "data/espeak" / it["audio"])}) + "\n" for it in english)
    )
    return path


def _fit_frozen(task: CTCTask, manifest: Path, root: Path) -> None:
    """One optimiser step with the encoder frozen, so its weights stay exactly as loaded."""
    data = SpeechDataModule(train_manifest=str(manifest), tokenizer="phoneme", max_batch_seconds=6.0)
    trainer = build_trainer(
        task,
        default_root_dir=str(root),
        accelerator="cpu",
        max_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(task, datamodule=data)


def test_fine_tuning_from_a_hugging_face_wavlm_directory_keeps_its_weights_and_outputs(manifest, tmp_path):
    torch.manual_seed(0)
    config = transformers.WavLMConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    reference = transformers.WavLMModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")

    task = CTCTask(
        init_from=str(tmp_path / "hf"), freeze_encoder_steps=10, encoder_overrides={"layerdrop": 0.0}
    )
    _fit_frozen(task, manifest, tmp_path / "run")
    assert task.encoder_config.hidden_size == 64 and task.encoder_config.num_layers == 2

    audio = torch.randn(2, 8000) * 0.1
    encoder = task.model.encoder.eval()
    with torch.no_grad():
        ours = encoder(audio, torch.tensor([8000, 8000])).last_hidden_state
        theirs = reference(audio).last_hidden_state
    assert (ours - theirs).abs().max().item() < 1e-4


def test_fine_tuning_from_a_speechlab_lightning_checkpoint_copies_the_encoder(manifest, tmp_path):
    L.seed_everything(0)
    pretrained = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    _fit_frozen(pretrained, manifest, tmp_path / "pre")
    checkpoint = tmp_path / "pre/checkpoints/last.ckpt"
    assert checkpoint.is_file()

    L.seed_everything(1)  # a different init, so equality below can only come from loading
    finetuned = CTCTask(
        encoder="wavlm_tiny",
        encoder_overrides={"num_layers": 1},
        init_from=str(checkpoint),
        freeze_encoder_steps=10,
    )
    _fit_frozen(finetuned, manifest, tmp_path / "ft")
    for (name, a), (_, b) in zip(
        pretrained.model.encoder.state_dict().items(),
        finetuned.model.encoder.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_mismatched_pretrained_encoder_is_a_clear_error(manifest, tmp_path):
    pretrained = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    _fit_frozen(pretrained, manifest, tmp_path / "pre")
    wrong = CTCTask(encoder="wavlm_tiny", init_from=str(tmp_path / "pre/checkpoints/last.ckpt"))
    with pytest.raises(ValueError, match="do not match encoder preset"):
        _fit_frozen(wrong, manifest, tmp_path / "ft")
