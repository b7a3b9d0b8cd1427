"""Under ``strategy: ddp`` (2 CPU processes, gloo) every task trains, and DDP's gradients are what one process
computes on the same global batch: the mean of the ranks' gradients (each rank's loss is normalised over its
own batch, as DDP averages), with the same randomness.

The cases are the ones that break a plain ``DistributedDataParallel``: LayerDrop (layers without a gradient), no
masking (an unused mask embedding), an encoder frozen for the first step, UniSpeech with a rank whose batch has
no labeled utterance (the CTC head has no gradient there), and the codec GAN (two backward passes a batch).
"""

from __future__ import annotations

from pathlib import Path

import kill_harness as kh
import pytest
import torch

TIMEOUT = 600

CTC_LAYERDROP = """model:
  class_path: speechlab.tasks.ctc.CTCTask
  init_args:
    encoder: wavlm_tiny
    encoder_overrides: {layerdrop: 0.5, num_layers: 4, dropout: 0.0, attention_dropout: 0.0, feature_dropout: 0.0}
    mask_prob: 0.0
    freeze_encoder_steps: 1
    optim: {lr: 3.0e-3, warmup_steps: 2}
"""

UNISPEECH = """model:
  class_path: speechlab.tasks.unispeech.UniSpeechTask
  init_args:
    model: unispeech_tiny
    encoder_overrides: {layerdrop: 0.0, dropout: 0.0, attention_dropout: 0.0, feature_dropout: 0.0}
    num_negatives: 10
    labeled_languages: [en]
    optim: {lr: 3.0e-3, warmup_steps: 2}
"""


def _run(tmp_path: Path, model: str, data: str, max_steps: int, probe: str = "GradientProbe") -> kh.FitRun:
    callbacks = [{"class_path": f"kill_harness.{probe}", "init_args": {"folder": str(tmp_path / "probe")}}]
    config = kh.write_config(
        tmp_path / "ddp.yaml",
        tmp_path / "run",
        model=model,
        data=data,
        max_steps=max_steps,
        trainer_extra={"devices": 2, "strategy": "ddp"},
        callbacks=callbacks,
    )
    run = kh.FitRun(config, tmp_path / "run", extra_args=[]).start(0)
    assert run.wait(TIMEOUT) == 0, run.output[-4000:]
    return run


def _check_reduced_is_mean_of_local(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reduced = ranks[0]["reduced"]
    assert reduced.keys() == ranks[1]["reduced"].keys()
    for name, grad in reduced.items():
        torch.testing.assert_close(ranks[1]["reduced"][name], grad, rtol=0, atol=0)  # one all-reduce result
        local = [r["local"].get(name, torch.zeros_like(grad)) for r in ranks]
        torch.testing.assert_close(grad, (local[0] + local[1]) / 2, rtol=1e-4, atol=1e-6, msg=name)
    assert set(reduced) == set(ranks[0]["local"]) | set(ranks[1]["local"]), "a gradient appeared or vanished"
    return {"reduced": reduced, "rank0": ranks[0]["local"], "rank1": ranks[1]["local"]}


@pytest.mark.slow
def test_ctc_with_layerdrop_unused_mask_embedding_and_frozen_encoder_matches_one_process(tmp_path):
    manifest = kh.tiny_manifest(tmp_path / "train.jsonl", 8)
    _run(tmp_path, CTC_LAYERDROP, kh.ctc_data(manifest), max_steps=3)
    grads = _check_reduced_is_mean_of_local(tmp_path / "probe")
    layers = {n.split(".")[4] for n in grads["reduced"] if n.startswith("model.encoder.encoder.layers.")}
    assert "0" in layers and len(layers) < 4, f"LayerDrop 0.5 over 4 layers dropped none this step: {layers}"
    # both ranks dropped the same layers (a shared draw), so one process on the global batch would too
    assert {n for n in grads["rank0"] if ".layers." in n} == {n for n in grads["rank1"] if ".layers." in n}
    assert "model.encoder.mask_emb" not in grads["reduced"], "no masking: the mask embedding has no gradient"


@pytest.mark.slow
def test_unispeech_rank_without_labeled_utterances_matches_one_process(tmp_path):
    # 2 short English (labeled) and 2 longer Swahili (unlabeled) utterances, 2 per batch: the length bucketing
    # puts the languages in different batches, so one rank sees only unlabeled speech.
    manifest = kh.tiny_manifest(tmp_path / "train.jsonl", 2, languages=("en", "sw"))
    _run(tmp_path, UNISPEECH, kh.ctc_data(manifest, max_batch_seconds=6.0), max_steps=2)
    grads = _check_reduced_is_mean_of_local(tmp_path / "probe")
    ctc_head = [n for n in grads["reduced"] if "ctc" in n]
    assert ctc_head, "the CTC head got a gradient on the labeled rank"
    with_head = [r for r in ("rank0", "rank1") if any("ctc" in n for n in grads[r])]
    assert len(with_head) == 1, f"expected exactly one rank with labeled speech, got {with_head}"


@pytest.mark.slow
def test_codec_gan_trains_under_ddp_and_ranks_stay_identical(tmp_path):
    model = """model:
  class_path: speechlab.tasks.codec.CodecTask
  init_args:
    codec: codec_tiny
    segment_seconds: 0.5
    generator_ema: 0.9
    optim: {lr: 2.0e-3, betas: [0.8, 0.99], weight_decay: 0.0, warmup_steps: 2, decay: constant}
    discriminator: {stft_n_ffts: [256], stft_filters: 4, periods: [2, 3], period_channels: [4, 8]}
"""
    data = f"""data:
  class_path: speechlab.data.datamodule.SpeechDataModule
  init_args:
    train_manifest: {kh.tiny_manifest(tmp_path / "train.jsonl", 8)}
    max_batch_seconds: 3.0
"""
    _run(tmp_path, model, data, max_steps=6, probe="WeightsAtEnd")  # 3 batches of discriminator + generator
    from speechlab.checkpoints.safe_load import load_torch_checkpoint

    assert load_torch_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 6
    rank0, rank1 = (torch.load(tmp_path / f"probe/rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name, weight in rank0.items():
        assert weight.isfinite().all(), name
        torch.testing.assert_close(rank1[name], weight, rtol=0, atol=0, msg=name)
