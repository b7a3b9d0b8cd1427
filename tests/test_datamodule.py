"""AudioDataset, collate/Batch and SpeechDataModule over the bundled corpora and small throw-away corpora."""

import itertools
import logging
import pickle
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from speechlab.data.collate import TARGET_PAD, UNIT_PAD, Batch, collate
from speechlab.data.datamodule import SpeechDataModule
from speechlab.data.dataset import AudioDataset, seed_worker
from speechlab.data.manifest import ManifestError, read_manifest
from speechlab.data.text import CharTokenizer, load_tokenizer


def _item(id, samples, targets=None, units=None, text=""):
    return {"id": id, "audio": torch.full((samples,), 0.5), "targets": targets, "units": units, "text": text,
            "language": "en", "speaker": None}  # fmt: skip


def test_collate_pads_audio_with_zeros_and_targets_and_units_with_minus_100():
    batch = collate([_item("a", 5, [3, 4], [1, 2, 3]), _item("b", 3, [5], [7])])
    assert len(batch) == 2 and batch.ids == ["a", "b"]
    assert batch.audio.shape == (2, 5) and batch.audio.dtype == torch.float32
    assert batch.lengths.tolist() == [5, 3] and batch.audio[1, 3:].abs().sum() == 0
    assert batch.targets.tolist() == [[3, 4], [5, TARGET_PAD]] and batch.target_lengths.tolist() == [2, 1]
    assert batch.units.tolist() == [[1, 2, 3], [7, UNIT_PAD, UNIT_PAD]] and batch.unit_lengths.tolist() == [
        3,
        1,
    ]
    assert batch.padding_mask.tolist() == [[False] * 5, [False] * 3 + [True] * 2]
    assert TARGET_PAD == UNIT_PAD == -100


def test_collate_drops_failed_items_and_an_all_failed_batch_is_empty():
    assert collate([None, _item("a", 4), None]).ids == ["a"]
    empty = collate([None, None])
    assert len(empty) == 0 and empty.audio.shape == (0, 0) and empty.targets is None


def test_batch_moves_through_lightning_device_transfer():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    batch = collate([_item("a", 4, [1]), _item("b", 2, [2, 3])])
    moved = move_data_to_device(batch, torch.device("meta"))
    assert (
        isinstance(moved, Batch) and moved.audio.device.type == "meta" and moved.targets.device.type == "meta"
    )
    assert moved.ids == ["a", "b"] and batch.audio.device.type == "cpu"
    assert batch.to("meta").lengths.device.type == "meta"


def test_dataset_items_carry_audio_targets_and_metadata(espeak_manifest):
    items = read_manifest(espeak_manifest)[:4]
    tokenizer = CharTokenizer.build([it["text"] for it in items])
    dataset = AudioDataset(items, tokenizer=tokenizer)
    sample = dataset[0]
    assert sample["audio"].shape == (items[0]["num_samples"],)
    assert tokenizer.decode(sample["targets"]) == " ".join(items[0]["text"].lower().split())
    assert sample["language"] == items[0]["language"] and sample["id"] == items[0]["id"]


def test_dataset_reads_units_and_crops_unlabeled_audio(tmp_corpus):
    tmp_corpus.add("u", seconds=1.0, units=" ".join(str(i % 7) for i in range(50)))
    items = read_manifest(tmp_corpus.write())
    full = AudioDataset(items, units_field="units")[0]
    assert full["units"] == [i % 7 for i in range(50)] and full["audio"].shape == (16000,)
    cropped = AudioDataset(items, units_field="units", max_seconds=0.5)[0]
    assert cropped["audio"].shape == (8000,) and cropped["units"] == full["units"][:25]
    with pytest.raises(ValueError, match="max_duration"):
        AudioDataset(items, tokenizer=CharTokenizer.build(["hello world"]), max_seconds=0.5)


def test_truncated_flac_is_an_error_at_load_time_or_a_counted_skip(tmp_corpus, caplog):
    tmp_corpus.add("ok")
    line = tmp_corpus.add("trunc", signal=np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32))
    path = tmp_corpus.root / line["audio"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    items = read_manifest(tmp_corpus.write())  # the header is intact: only decoding finds the damage
    from speechlab.audio import AudioError

    with pytest.raises(AudioError, match="trunc.flac"):
        AudioDataset(items)[1]
    dataset = AudioDataset(items, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="speechlab.data.dataset"):
        batch = collate([dataset[0], dataset[1]])
    assert batch.ids == ["ok"] and dataset.skipped == {"audio": 1}
    assert "trunc" in caplog.text


def test_datamodule_builds_phoneme_loaders_over_espeak_within_the_budget(espeak_manifest):
    dm = SpeechDataModule(str(espeak_manifest), val_manifest=str(espeak_manifest), tokenizer="phoneme",
                          max_batch_seconds=30.0, languages=["tr"])  # fmt: skip
    assert dm.tokenizer.field == "phonemes" and {it["language"] for it in dm.train_items} == {"tr"}
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert dm.train_sampler is loader.batch_sampler and len(loader) == len(dm.train_sampler)
    by_id = {it["id"]: it for it in dm.train_items}
    seen = []
    for batch in loader:
        seconds = batch.lengths.max().item() / 16000
        assert len(batch) == 1 or seconds * len(batch) <= 30.0 + 1e-3
        for row, uid in enumerate(batch.ids):
            ids = batch.targets[row, : batch.target_lengths[row]].tolist()
            assert dm.tokenizer.decode(ids) == " ".join(by_id[uid]["phonemes"].split())
        seen += batch.ids
    assert sorted(seen) == sorted(by_id)
    val = dm.val_dataloader()
    assert list(val.batch_sampler) == list(dm.val_dataloader().batch_sampler)  # deterministic, not shuffled
    assert sorted(i for b in val.batch_sampler for i in b) == list(range(len(dm.val_items)))


def test_datamodule_builds_char_loaders_over_ljspeech_and_saves_the_tokenizer(ljspeech_manifest, tmp_path):
    dm = SpeechDataModule(str(ljspeech_manifest), tokenizer="char", tokenizer_dir=str(tmp_path / "tok"),
                          max_batch_seconds=40.0, max_batch_size=3)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert 1 <= len(batch) <= 3 and batch.targets.shape[0] == len(batch) and batch.texts[0]
    assert load_tokenizer(tmp_path / "tok").units == dm.tokenizer.units
    again = SpeechDataModule(str(ljspeech_manifest), tokenizer_dir=str(tmp_path / "tok"))  # loads, no rebuild
    assert again.tokenizer.units == dm.tokenizer.units
    assert dm.val_dataloader() == []  # no val manifest: Lightning skips validation


def test_sentencepiece_datamodule_uses_vocab_size(ljspeech_manifest):
    dm = SpeechDataModule(str(ljspeech_manifest), tokenizer="sentencepiece", vocab_size=48)
    assert dm.tokenizer.kind == "sentencepiece" and dm.tokenizer.vocab_size <= 49


def test_duration_filters_drop_tiny_clips_and_half_hour_files_with_a_logged_count(tmp_corpus, caplog):
    tmp_corpus.add(
        "tiny", signal=np.zeros(300, dtype=np.float32)
    )  # < 400 samples: shorter than the receptive field
    tmp_corpus.add("normal", seconds=1.0)
    # a 30-minute file (at 1 kHz to keep the test small; the manifest duration is what the filter reads)
    tmp_corpus.add("half_hour", signal=np.zeros(1800 * 1000, dtype=np.float32), sample_rate=1000)
    path = str(tmp_corpus.write())
    with caplog.at_level(logging.WARNING, logger="speechlab.data.datamodule"):
        dm = SpeechDataModule(path, min_duration=400 / 16000, max_duration=60.0)
    assert [it["id"] for it in dm.train_items] == ["normal"]
    assert "filtered out 2 of 3" in caplog.text
    with pytest.raises(ValueError, match="no items left"):
        SpeechDataModule(path, languages=["xx"])


def test_unknown_unit_in_the_validation_manifest_names_the_line(tmp_corpus, tmp_path):
    tmp_corpus.add("a", text="abc")
    train = str(tmp_corpus.write())
    tmp_corpus.lines = []
    tmp_corpus.add("b", text="abc")
    tmp_corpus.add("c", text="abq")
    val = str(tmp_corpus.write(name="val.jsonl"))
    dm = SpeechDataModule(train, val_manifest=val, tokenizer="char")
    with pytest.raises(ManifestError, match=r"val.jsonl:2: field 'text'.*'q'"):
        dm.setup("fit")
    skipping = SpeechDataModule(train, val_manifest=val, tokenizer="char", on_error="skip")
    skipping.setup("fit")
    assert [it["id"] for it in skipping.val_items] == ["b"]


def test_empty_transcripts_are_an_error_for_text_training_and_a_skip_on_request(tmp_corpus):
    tmp_corpus.add("a", text="hello")
    tmp_corpus.add("b", text="   ")
    path = str(tmp_corpus.write())
    with pytest.raises(ManifestError, match="manifest.jsonl:2: field 'text'"):
        SpeechDataModule(path, tokenizer="char")
    assert [it["id"] for it in SpeechDataModule(path, tokenizer="char", on_error="skip").train_items] == ["a"]
    assert len(SpeechDataModule(path).train_items) == 2  # audio-only training does not need text


def test_datamodule_state_dict_resumes_the_train_order_mid_epoch(espeak_manifest):
    kwargs = dict(max_batch_seconds=10.0, seed=3, check_audio="none", languages=["cy"])
    dm = SpeechDataModule(str(espeak_manifest), **kwargs)
    loader = dm.train_dataloader()
    dm.train_sampler.set_epoch(1)
    full = [list(b) for b in dm.train_sampler]
    consumed = [b.ids for b in itertools.islice(iter(loader), 4)]
    state = dm.state_dict()
    assert state == {"epoch": 1, "seed": 3, "position": 4}

    resumed = SpeechDataModule(str(espeak_manifest), **kwargs)
    resumed.load_state_dict(state)  # Lightning restores the datamodule before building the loaders
    remaining = [b.ids for b in resumed.train_dataloader()]
    ids = [it["id"] for it in dm.train_items]
    assert consumed + remaining == [[ids[i] for i in b] for b in full]


def test_lightning_fit_runs_over_the_datamodule(espeak_manifest, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.epochs, self.sizes = [], []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, Batch) and batch.targets is not None
            self.sizes.append(len(batch))
            return (self.weight * batch.audio.mean()).sum()

        def on_train_epoch_start(self):
            self.epochs.append(self.trainer.datamodule.train_sampler.epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SpeechDataModule(str(espeak_manifest), tokenizer="char", max_batch_seconds=60.0, languages=["cy"])
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, use_distributed_sampler=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert probe.epochs == [0, 1]  # Lightning reached set_epoch
    assert sum(probe.sizes) == 2 * len(dm.train_items)


def test_unknown_unit_at_load_time_is_an_error_or_a_counted_skip(tmp_corpus):
    tmp_corpus.add("a", text="abc")
    tmp_corpus.add("b", text="abq")
    items = read_manifest(tmp_corpus.write())
    tokenizer = CharTokenizer.build(["abc"])
    from speechlab.data.text import UnknownUnitError

    with pytest.raises(UnknownUnitError, match="'q'"):
        AudioDataset(items, tokenizer=tokenizer)[1]
    dataset = AudioDataset(items, tokenizer=tokenizer, on_error="skip")
    assert collate([dataset[0], dataset[1]]).ids == ["a"] and dataset.skipped == {"unknown_unit": 1}


def test_a_tokenizer_dir_of_another_kind_is_a_clear_error(ljspeech_manifest, tmp_path):
    SpeechDataModule(str(ljspeech_manifest), tokenizer="char", tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="holds a 'char' tokenizer"):
        SpeechDataModule(
            str(ljspeech_manifest), tokenizer="sentencepiece", tokenizer_dir=str(tmp_path / "tok")
        )
    with pytest.raises(FileNotFoundError, match="units.json"):
        SpeechDataModule(str(ljspeech_manifest), tokenizer_dir=str(tmp_path / "empty"))


def test_loaders_work_with_worker_processes(ljspeech_manifest):
    dm = SpeechDataModule(str(ljspeech_manifest), tokenizer="sentencepiece", vocab_size=48, num_workers=1,
                          max_batch_seconds=30.0, max_batch_size=2)  # fmt: skip
    loader = dm.train_dataloader()
    batches = list(itertools.islice(iter(loader), 2))
    assert all(isinstance(b, Batch) and b.targets is not None for b in batches)
    assert [b.ids for b in batches] == [
        [dm.train_items[i]["id"] for i in b] for b in list(dm.train_sampler)[:2]
    ]


def test_ddp_workers_start_from_a_fork_server_while_threads_come_and_go(ljspeech_manifest, monkeypatch):
    """Under DDP a fork of the threaded trainer can deadlock the child (datamodule.worker_context): there workers
    start from a fork server, also while other threads start and end at that moment; one process keeps fork."""
    dm = SpeechDataModule(str(ljspeech_manifest), tokenizer="char", num_workers=2, max_batch_size=2)
    assert dm.train_dataloader().multiprocessing_context is None
    monkeypatch.setattr(SpeechDataModule, "_world", lambda self: (2, 0))
    loader = dm.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    stop = threading.Event()

    def churn() -> None:  # threads that come and go, as gloo's and the queue feeders do
        while not stop.is_set():
            threading.Thread(target=lambda: None).start()

    busy = [threading.Thread(target=churn) for _ in range(2)]
    for thread in busy:
        thread.start()
    try:
        batch = next(iter(loader))
    finally:
        stop.set()
        for thread in busy:
            thread.join()
    assert isinstance(batch, Batch) and batch.ids == [
        dm.train_items[i]["id"] for i in next(iter(dm.train_sampler))
    ]


def test_what_a_ddp_worker_unpickles_imports_no_lightning(ljspeech_manifest, monkeypatch):
    """A fork-server worker imports the module of everything it is handed: the dataset, the collate function and
    the worker init function must not pull in Lightning (with Lightning's own init function, each of 8 workers a
    rank imported Lightning, torchmetrics and transformers: 86 s instead of 109 s for a ctc_100h rehearsal)."""
    monkeypatch.setattr(SpeechDataModule, "_world", lambda self: (2, 1))
    loader = SpeechDataModule(str(ljspeech_manifest), tokenizer="char", num_workers=2).train_dataloader()
    payload = pickle.dumps((loader.dataset, loader.collate_fn, loader.worker_init_fn))
    code = (
        "import pickle, sys\n"
        "dataset, collate_fn, init = pickle.loads(sys.stdin.buffer.read())\n"
        "init(0)\n"
        "print(len(dataset), sorted(m for m in ('lightning', 'torchmetrics', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == [str(len(loader.dataset)), "[]"]


def test_worker_seeds_differ_by_rank_and_repeat_by_rank():
    def draws(rank: int) -> list[float]:
        torch.manual_seed(1234)  # what every rank's worker 0 starts from after a shared seed_everything
        seed_worker(0, rank=rank)
        return [torch.rand(1).item(), random.random(), float(np.random.rand())]

    assert draws(0) == draws(0) and draws(1) == draws(1)
    assert all(a != b for a, b in zip(draws(0), draws(1), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_reach_the_gpu(ljspeech_manifest):
    dm = SpeechDataModule(str(ljspeech_manifest), tokenizer="char", pin_memory=True, max_batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch.audio.is_pinned() and batch.targets.is_pinned()
    moved = batch.to("cuda")
    assert moved.audio.is_cuda and moved.lengths.is_cuda and moved.ids == batch.ids
