"""The training step reads no tensor value on the host on an accelerator (issue 13, item 5).

This machine has no GPU, so the accelerator code path is forced on the CPU (``speechlab.host_sync.device_path``) and
every host read is counted by :class:`speechlab.host_sync.HostSyncCounter`, which sees what would synchronise a
CUDA device (scalar reads, data-dependent output sizes, boolean-mask indexing, ``.tolist()`` / ``.cpu()``).
The same path must give what the CPU path gives.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from speechlab.augment.mixing import MixingConfig, UtteranceMixer
from speechlab.data.collate import UNIT_PAD, Batch
from speechlab.host_sync import HostSyncCounter, device_path
from speechlab.nn.masking import span_mask
from speechlab.nn.rvq import ResidualVectorQuantizer
from speechlab.tasks.base import NonFiniteError
from speechlab.tasks.ctc import CTC_TOO_LONG
from speechlab.tasks.wavlm_pretrain import WavLMPretrainTask

# The one host read left in a WavLM step: LayerDrop's keep flags, drawn on the CPU from a CPU generator (a CPU
# tensor on every device, so reading it does not wait for the GPU).
ALLOWED_SITES = ("speechlab/nn/transformer.py", "keep.tolist()")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(lengths=(16000, 11000, 6000), num_classes=12, seed=0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    audio = 0.1 * torch.randn(len(lengths), width, generator=generator)
    lengths_t = torch.tensor(lengths)
    audio = audio.masked_fill(torch.arange(width)[None] >= lengths_t[:, None], 0.0)
    units = torch.randint(0, num_classes, (len(lengths), width // 320), generator=generator)
    units = units.masked_fill(torch.arange(units.shape[1])[None] >= (lengths_t // 320)[:, None], UNIT_PAD)
    return Batch(ids=[str(i) for i in range(len(lengths))], audio=audio, lengths=lengths_t, units=units)


def _task(layerdrop: float = 0.0) -> WavLMPretrainTask:
    torch.manual_seed(0)
    noise = [0.05 * torch.randn(4000, generator=torch.Generator().manual_seed(1))]
    task = WavLMPretrainTask(
        num_classes=12,
        final_dim=16,
        encoder_overrides={"layerdrop": layerdrop},
        mixing=MixingConfig(mix_prob=1.0),
    )
    task.mixer = UtteranceMixer(noise, mix_prob=1.0, noise_prob=0.5, seed=0)
    return task.train()


def _step(task, optimizer, batch, batch_idx):
    loss = task.training_step(batch, batch_idx)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    task.on_before_optimizer_step(optimizer)
    optimizer.step()
    task.on_train_batch_end(loss, batch, batch_idx)
    return loss


def _unexpected(syncs):
    return [s for s in syncs if not all(part in s.site for part in ALLOWED_SITES)]


def test_the_counter_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    with HostSyncCounter() as counter:
        x.sum().item()
        bool(x[0])
        int(x[1])
        x[x > 2]
        x.nonzero()
        x.tolist()
        x.cpu()
        x.to("cpu")
        torch.unique(x)
        x.sum()  # not a host read
        x.to(torch.float64)  # not one either
    kinds = [s.kind for s in counter.syncs]
    assert kinds.count(".item() / bool() / int() / float()") == 3
    assert "boolean-mask indexing" in kinds and "nonzero" in kinds and "unique" in kinds
    assert kinds.count(".tolist()") == 1 and kinds.count(".cpu()") == 1 and kinds.count(".to()") == 1
    assert len(kinds) == 9
    assert all("test_host_syncs.py" in s.site for s in counter.syncs)


def test_a_wavlm_training_step_reads_nothing_on_the_host_on_the_device_path():
    task = _task(layerdrop=0.5)
    task.encoder.encoder.reseed_shared(0)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3, fused=True)
    batch = _batch()
    with device_path():
        _step(task, optimizer, batch, 0)  # the first step checks the unit ids once (a host read, by design)
        with HostSyncCounter() as counter:
            for batch_idx in (1, 2):
                _step(task, optimizer, batch, batch_idx)
    assert _unexpected(counter.syncs) == [], "\n".join(f"{s.kind} at {s.site}" for s in counter.syncs)
    assert len(counter.syncs) == 2  # LayerDrop's CPU flags, once per step


def test_the_cpu_path_does_read_on_the_host_so_the_count_above_means_something():
    task = _task()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    batch = _batch()
    _step(task, optimizer, batch, 0)
    with HostSyncCounter() as counter:
        _step(task, optimizer, batch, 1)
    sites = "\n".join(s.site for s in _unexpected(counter.syncs))
    for where in ("transformer.py", "ssl_encoder.py", "base.py"):
        assert where in sites, sites


def test_the_device_path_gives_the_cpu_path_loss_and_gradients():
    batch = _batch()
    results = {}
    for name in ("cpu", "device"):
        task = (
            _task().eval()
        )  # no dropout: the per-utterance CPU path draws its dropout masks in another order
        with device_path() if name == "device" else torch.enable_grad():
            torch.manual_seed(3)  # the span mask's draws
            loss = task.training_step(batch, 0)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), grads)
    (cpu_loss, cpu_grads), (dev_loss, dev_grads) = results["cpu"], results["device"]
    torch.testing.assert_close(dev_loss, cpu_loss, atol=1e-5, rtol=1e-5)
    assert cpu_grads.keys() == dev_grads.keys()
    for name in cpu_grads:
        torch.testing.assert_close(dev_grads[name], cpu_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_span_mask_equalisation_without_host_reads_matches_the_reference_count():
    lengths = torch.tensor([0, 40, 55, 70])
    with HostSyncCounter() as counter:
        mask = span_mask(lengths, 0.65, 10, num_frames=70, generator=torch.Generator().manual_seed(0))
    assert counter.syncs == []
    counts = mask.sum(-1)
    assert counts[0] == 0 and counts[1:].unique().numel() == 1  # every row with frames masks the same count


@pytest.mark.parametrize("poison", ["gradient", "loss"])
def test_a_nonfinite_step_is_skipped_on_the_device_like_on_the_host(poison):
    batch = _batch()
    task = _task()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3, fused=True)
    with device_path():
        _step(task, optimizer, batch, 0)
        weights = copy.deepcopy(task.state_dict())
        moments = copy.deepcopy(optimizer.state_dict()["state"])
        with HostSyncCounter() as counter:
            loss = task.training_step(batch, 1)
            if poison == "loss":
                loss = loss * torch.tensor(float("nan"))
                task._loss_nonfinite = None
                task.check_finite_loss(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if poison == "gradient":
                next(task.parameters()).grad[0] = float("inf")
            task.on_before_optimizer_step(optimizer)
            optimizer.step()
            task.on_train_batch_end(loss, batch, 1)
        assert _unexpected(counter.syncs) == []
        assert task.nonfinite_steps == 0  # not read yet
        task._read_nonfinite_counters(final=True)
    assert task.nonfinite_steps == 1 and task._consecutive_nonfinite == 1
    for name, value in task.state_dict().items():
        torch.testing.assert_close(value, weights[name], atol=0, rtol=0, msg=name)
    for key, state in optimizer.state_dict()["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(value, moments[key][field], atol=0, rtol=0)


def test_consecutive_nonfinite_steps_on_the_device_stop_training_at_the_next_read():
    batch = _batch()
    task = _task()
    task.max_nonfinite_steps = 3
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3, fused=True)
    with device_path():
        for batch_idx in range(3):
            loss = task.training_step(batch, batch_idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            next(task.parameters()).grad[0] = float("nan")
            task.on_before_optimizer_step(optimizer)
            optimizer.step()
            task.on_train_batch_end(loss, batch, batch_idx)
        task._read_nonfinite_counters()  # a checkpoint's read counts but does not stop
        assert task.nonfinite_steps == 3
        with pytest.raises(NonFiniteError, match="3 consecutive steps"):
            task._read_nonfinite_counters(final=True)


def _rvq_input(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 20, generator=generator)
    lengths = torch.tensor([20, 14, 9])
    x[1, :, 14:] = float("inf")  # garbage in padded frames must not reach the codebooks on either path
    x[2, :, 9:] = 1e3
    return x, lengths


def _rvq(threshold: float):
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(
        8, num_quantizers=3, codebook_size=16, kmeans_iters=3, dead_code_threshold=threshold
    )
    return rvq.train()


def test_an_rvq_training_step_reads_nothing_on_the_host_after_the_kmeans_initialisation():
    rvq = _rvq(threshold=2.0)
    x, lengths = _rvq_input()
    with device_path():
        rvq(x, lengths)  # first batch: k-means initialisation (host reads, once)
        with HostSyncCounter() as counter:
            for _ in range(2):
                rvq(x, lengths)
    assert counter.syncs == [], "\n".join(f"{s.kind} at {s.site}" for s in counter.syncs)


def test_the_rvq_device_path_updates_the_codebooks_like_the_cpu_path():
    x, lengths = _rvq_input()
    states, outputs = {}, {}
    for name in ("cpu", "device"):
        rvq = _rvq(threshold=0.0)  # nothing dead: the dead-code draw replaces nothing on either path
        torch.manual_seed(1)
        rvq(x, lengths)  # the same k-means initialisation for both
        with device_path() if name == "device" else torch.enable_grad():
            torch.manual_seed(2)
            outputs[name] = rvq(x, lengths)
        states[name] = rvq.state_dict()
    for key, value in states["cpu"].items():
        torch.testing.assert_close(states["device"][key], value, msg=key)
    assert torch.equal(outputs["device"].codes, outputs["cpu"].codes)
    torch.testing.assert_close(outputs["device"].perplexity, outputs["cpu"].perplexity)


def test_dead_codes_replaced_on_the_device_path_come_from_valid_frames_only():
    rvq = _rvq(threshold=1e9)  # every code is dead after each update
    x, lengths = _rvq_input()
    with device_path():
        rvq(x, lengths)
        out = rvq(x, lengths)
    assert (out.replaced == 16).all()
    level = rvq.levels[0]
    valid_frames = x.transpose(1, 2)[torch.arange(20)[None] < lengths[:, None]]  # (N_valid, 8)
    distances = torch.cdist(level.embed, valid_frames, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-6


def test_a_ctc_training_step_reads_on_the_host_only_inside_ctc_loss():
    """What the counter can see on the CPU: no host read in the CTC fine-tuning step on the device path. Not seen
    here: ``F.ctc_loss`` copies the input and target lengths to the host inside ATen (a sync on CUDA per step)."""
    from speechlab.data.text import CharTokenizer
    from speechlab.tasks.ctc import CTCTask

    torch.manual_seed(0)
    task = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 2}, mask_prob=0.3, mask_length=4)
    tokenizer = CharTokenizer.build(["a cab", "bad"])
    task.build(tokenizer)
    task.train()
    batch = _batch(lengths=(16000, 12000))
    texts = ["a cab", "bad"]
    encoded = [torch.tensor(tokenizer.encode(t)) for t in texts]
    batch.targets = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=-100)
    batch.target_lengths = torch.tensor([len(e) for e in encoded])
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3, fused=True)
    with device_path():
        _step(task, optimizer, batch, 0)
        with HostSyncCounter() as counter:
            _step(task, optimizer, batch, 1)
    assert _unexpected(counter.syncs) == [], "\n".join(f"{s.kind} at {s.site}" for s in counter.syncs)


# ----------------------------------------------------------------- the same through Lightning (tiny CTC runs)


@pytest.fixture(scope="module")
def fault_manifest(tmp_path_factory):
    import kill_harness as kh

    return kh.tiny_manifest(tmp_path_factory.mktemp("faults") / "train.jsonl", 4)


def test_through_lightning_a_nonfinite_step_on_the_device_path_equals_never_applying_that_batch(
    fault_manifest, tmp_path
):
    from test_numerical_faults import _fit

    with device_path():
        reference, _ = _fit(fault_manifest, tmp_path / "skip", 4, poison="skip", at=(1,))
        task, audit = _fit(fault_manifest, tmp_path / "nan", 4, poison="loss", at=(1,))
    assert task.trainer.optimizers[0].defaults["fused"], "the device path steps a fused AdamW"
    assert task.nonfinite_steps == 1  # read at the end of training
    assert audit.changed == {0: True, 1: False, 2: True, 3: True}, audit.changed
    assert audit.optimizer_changed[1] is False
    for (name, expected), (_, actual) in zip(
        reference.state_dict().items(), task.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_through_lightning_consecutive_nonfinite_steps_on_the_device_path_stop_at_the_next_read(
    fault_manifest, tmp_path, monkeypatch
):
    from test_numerical_faults import PoisonedCTCTask, _fit

    monkeypatch.setattr(PoisonedCTCTask, "nonfinite_check_every", 1)
    with (
        device_path(),
        pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss or gradient"),
    ):
        _fit(fault_manifest, tmp_path, 8, poison="grad", at=(1, 2, 3, 4, 5, 6), max_nonfinite_steps=3)


class _BatchAudit(L.Callback):
    """Parameters of the generator, its EMA copy and the discriminator before/after every batch; host reads of
    the batches from ``count_from`` on (the first batches initialise the codebooks)."""

    def __init__(self, count_from: int) -> None:
        self.count_from = count_from
        self.changed: dict[int, dict[str, bool]] = {}
        self.syncs = []
        self._before = None
        self._counter = None

    @staticmethod
    def _snapshot(task):
        return {
            name: [p.detach().clone() for p in module.parameters()]
            for name, module in (("codec", task.codec), ("ema", task.codec_ema), ("disc", task.discriminator))
        }

    def on_train_batch_start(self, trainer, task, batch, batch_idx) -> None:
        self._before = self._snapshot(task)
        if batch_idx >= self.count_from:
            self._counter = HostSyncCounter().__enter__()

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.syncs += self._counter.syncs
            self._counter = None
        after = self._snapshot(task)
        self.changed[batch_idx] = {
            name: any(not torch.equal(a, b) for a, b in zip(self._before[name], after[name], strict=True))
            for name in after
        }


def test_through_lightning_a_codec_gan_step_skips_a_nonfinite_generator_update_on_the_device(tmp_path):
    from test_codec_task import real_batch, tiny_task

    torch.manual_seed(0)
    audio, lengths = real_batch(2, 0.4)
    task = tiny_task(segment_seconds=0.4)
    losses = task.generator_losses

    def poisoned(*args, **kwargs):
        total, parts = losses(*args, **kwargs)
        return (total * float("nan") if task.batches_seen == 2 else total), parts

    task.generator_losses = poisoned
    audit = _BatchAudit(count_from=3)
    trainer = L.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=10,  # 5 batches: D step + G step each
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[audit],
        limit_val_batches=0,
    )
    with device_path():
        trainer.fit(task, torch.utils.data.DataLoader([(audio, lengths)] * 5, batch_size=None))
    assert all(getattr(o, "defaults", {}).get("fused") for o in trainer.optimizers)
    assert audit.changed[2] == {"codec": False, "ema": False, "disc": True}, audit.changed
    assert audit.changed[1] == audit.changed[3] == {"codec": True, "ema": True, "disc": True}
    assert task.nonfinite_steps == 1
    assert _unexpected(audit.syncs) == [], "\n".join(f"{s.kind} at {s.site}" for s in audit.syncs)


def test_the_unispeech_device_path_gives_the_cpu_path_losses_without_reading_the_labeled_rows():
    from test_unispeech_task import ESPEAK, _items, _task

    from speechlab.audio import load_audio
    from speechlab.data.collate import collate
    from speechlab.data.text import PhonemeTokenizer

    items = _items()  # 2 English (labeled) + 2 Swahili (unlabeled) utterances
    tokenizer = PhonemeTokenizer.build([it["phonemes"] for it in items])
    batch = collate(
        [
            {
                "id": it["id"],
                "audio": load_audio(ESPEAK / it["audio"])[:24000],
                "targets": tokenizer.encode(" ".join(it["phonemes"].split()[:12])),
                "language": it["language"],
            }
            for it in items
        ]
    )
    results = {}
    for name in ("cpu", "device"):
        task = _task(tokenizer).train()
        with device_path() if name == "device" else torch.enable_grad():
            # a generator: the same masks, distractors and Gumbel noise on both paths
            parts = task.compute_losses(batch, generator=torch.Generator().manual_seed(0))
        parts["loss"].backward()
        results[name] = (parts, {n: p.grad for n, p in task.named_parameters() if p.grad is not None})
    (cpu, cpu_grads), (device, device_grads) = results["cpu"], results["device"]
    assert device["num_labeled"] == 2
    for key in ("loss", "ctc", "contrastive", CTC_TOO_LONG):
        torch.testing.assert_close(device[key], cpu[key], msg=key)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(device_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # a training step (no generator: the mask is drawn on the device): what remains is the contrastive loss over
    # the (variable number of) masked frames, forward and backward (the backward's index_put is credited to the
    # frame that called backward)
    with device_path(), HostSyncCounter() as counter:
        task.compute_losses(batch)["loss"].backward()
    sites = {s.site.split(":")[0] for s in _unexpected(counter.syncs)}
    assert sites == {"speechlab/nn/contrastive.py", "tests/test_host_syncs.py"}, sites
