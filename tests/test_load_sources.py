"""speechlab.load's reader registry: Lightning checkpoints of every task, run folders, HF *ForCTC and EnCodec
directories, the CTC pretrained family, and the safety checks on each new path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from speechlab.api import load
from speechlab.audio import load_audio
from speechlab.checkpoints import registry
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.checkpoints.run_dir import run_checkpoint
from speechlab.checkpoints.safe_load import CheckpointError, UnsafeCheckpointError
from speechlab.data.collate import collate
from speechlab.data.text import CharTokenizer, PhonemeTokenizer
from speechlab.models.codec import Codec
from speechlab.models.ctc import CTCConfig, CTCModel
from speechlab.models.ssl_encoder import SSLEncoder
from speechlab.models.unispeech import UniSpeech

REPO = Path(__file__).resolve().parents[1]
ESPEAK = REPO / "data" / "espeak"


@pytest.fixture(scope="module")
def batch_and_tokenizer():
    rows = [json.loads(line) for line in (ESPEAK / "manifest.jsonl").read_text().splitlines()][:2]
    tokenizer = PhonemeTokenizer.build([r["phonemes"] for r in rows])
    items = [
        {
            "id": r["id"],
            "audio": load_audio(ESPEAK / r["audio"])[:16000],
            "targets": tokenizer.encode(" ".join(r["phonemes"].split()[:8])),
            "units": torch.randint(0, 8, (50,), generator=torch.Generator().manual_seed(i)),
            "language": "en",
        }
        for i, r in enumerate(rows)
    ]
    return collate(items), tokenizer


def _tasks(tokenizer):
    from speechlab.tasks.codec import CodecTask
    from speechlab.tasks.ctc import CTCTask
    from speechlab.tasks.unispeech import UniSpeechTask
    from speechlab.tasks.wavlm_pretrain import WavLMPretrainTask

    ctc = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    ctc.build(tokenizer)  # what setup() does with the data module's tokenizer
    return {
        "ctc": ctc,
        "wavlm": WavLMPretrainTask(num_classes=8, final_dim=16, encoder_overrides={"num_layers": 1}),
        "unispeech": UniSpeechTask(num_ctc_classes=tokenizer.vocab_size, num_negatives=5),
        "codec": CodecTask(codec="codec_tiny", segment_seconds=0.4),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, batch_and_tokenizer):
    """One-step runs of every task through the standard trainer (no validation, so no best checkpoint)."""
    from speechlab.train import build_trainer

    batch, tokenizer = batch_and_tokenizer
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    tasks = _tasks(tokenizer)
    for name, task in tasks.items():
        trainer = build_trainer(task, default_root_dir=str(root / name), max_steps=1, limit_val_batches=0,
                                enable_progress_bar=False, enable_model_summary=False, logger=False,
                                accelerator="cpu")  # fmt: skip
        trainer.fit(task, train_dataloaders=DataLoader([batch], batch_size=None))
    return root, tasks


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours = model.state_dict()
    expected = reference.state_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value.cpu(), msg=key)


@pytest.mark.parametrize(
    "name, cls, attribute",
    [("ctc", CTCModel, "model"), ("wavlm", SSLEncoder, "encoder"), ("unispeech", UniSpeech, "model"),
     ("codec", Codec, "codec_ema")],
)  # fmt: skip
def test_every_task_checkpoint_and_run_folder_load_as_the_trained_model(runs, name, cls, attribute):
    root, tasks = runs
    trained = getattr(tasks[name], attribute)
    for source in (root / name / "checkpoints" / "last.ckpt", root / name, root / name / "pretrained"):
        model = load(source)
        assert isinstance(model, cls), source
        _same_weights(model, trained)
    if name == "ctc":
        assert load(root / name).tokenizer.units == tasks[name].tokenizer.units


def test_a_run_without_validation_has_no_best_checkpoint_and_says_why(runs):
    root, _ = runs
    assert run_checkpoint(root / "ctc", "auto").name == "last.ckpt"
    with pytest.raises(CheckpointError, match="no best checkpoint.*validation never ran"):
        run_checkpoint(root / "ctc", "best")


def _ctc_checkpoint(runs, tmp_path, change) -> Path:
    root, _ = runs
    checkpoint = torch.load(root / "ctc" / "checkpoints" / "last.ckpt", weights_only=True)
    change(checkpoint)
    path = tmp_path / "changed.ckpt"
    torch.save(checkpoint, path)
    return path


def test_checkpoint_with_wrong_shapes_lists_them(runs, tmp_path):
    def widen(checkpoint):
        checkpoint["state_dict"]["model.encoder.encoder.layers.0.feed_forward.fc1.weight"] = torch.zeros(3, 3)

    with pytest.raises(CheckpointError, match=r"mismatches: encoder\.encoder\.layers\.0\.feed_forward\.fc1"):
        load(_ctc_checkpoint(runs, tmp_path, widen))


def test_absurd_encoder_config_in_a_checkpoint_is_refused_before_building(runs, tmp_path, monkeypatch):
    def huge(checkpoint):
        checkpoint["encoder_config"]["hidden_size"] = 4_000_000

    path = _ctc_checkpoint(runs, tmp_path, huge)

    def no_build(*args, **kwargs):
        raise AssertionError("model was built")

    monkeypatch.setattr(SSLEncoder, "__init__", no_build)
    with pytest.raises(CheckpointError, match="hidden_size=4000000"):
        load(path)


def test_crafted_tokenizer_file_names_are_refused(runs, tmp_path):
    def escape(checkpoint):
        checkpoint["tokenizer_files"]["../../evil"] = b"x"

    with pytest.raises(CheckpointError, match="tokenizer"):
        load(_ctc_checkpoint(runs, tmp_path, escape))
    assert not (tmp_path.parent.parent / "evil").exists()


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('MARKER', 'w').write('ran')",))


def test_unsafe_lightning_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": {}, "pytorch-lightning_version": "2", "x": _RunsCode()}, handle)
    with pytest.raises(UnsafeCheckpointError):
        load(path)
    assert not (tmp_path / "MARKER").exists()


def test_lightning_checkpoint_renamed_pt_is_still_read(runs, tmp_path):
    root, tasks = runs
    path = tmp_path / "renamed.pt"
    path.write_bytes((root / "wavlm" / "checkpoints" / "last.ckpt").read_bytes())
    _same_weights(load(path), tasks["wavlm"].encoder)


# ------------------------------------------------------------------------------------------- pretrained CTC


def _tiny_ctc(tokenizer, conv_norm: str = "layer") -> CTCModel:
    from speechlab.models.registry import build_config

    torch.manual_seed(0)
    config = build_config("ssl_encoder", "wavlm_tiny", {"num_layers": 1, "conv_norm": conv_norm})
    model = CTCModel(CTCConfig(config, tokenizer.vocab_size, 0.0)).eval()
    model.tokenizer = tokenizer
    return model


def test_ctc_family_round_trips_with_its_tokenizer(tmp_path):
    tokenizer = CharTokenizer.build(["hello world", "a cat"])
    model = _tiny_ctc(tokenizer)
    save_pretrained(model, tmp_path / "m", family="ctc")
    loaded = load(tmp_path / "m")
    assert isinstance(loaded, CTCModel) and loaded.tokenizer.units == tokenizer.units
    _same_weights(loaded, model)
    assert "Transcriber" in (tmp_path / "m" / "README.md").read_text()


def test_ctc_family_needs_a_tokenizer_that_fits_the_head(tmp_path):
    tokenizer = CharTokenizer.build(["hello world"])
    model = _tiny_ctc(tokenizer)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        save_pretrained(model, tmp_path / "m", family="ctc")
    save_pretrained(model, tmp_path / "m", family="ctc", tokenizer=CharTokenizer.build(["ab"]))
    with pytest.raises(CheckpointError, match="tokenizer has .* units but the model head has"):
        load(tmp_path / "m")


# ------------------------------------------------------------------------------------------- Hugging Face


def _hf_ctc_dir(
    directory: Path, vocab: dict[str, int], pad: str = "<pad>", kind: str = "WavLM"
) -> torch.nn.Module:
    import transformers

    extra = {"num_buckets": 32, "max_bucket_distance": 64} if kind == "WavLM" else {}
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=[32] * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=len(vocab), pad_token_id=vocab[pad],
        **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCTC")(config).eval()
    model.save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), pad_token=pad).save_pretrained(
        str(directory)
    )
    return model


@pytest.mark.parametrize("kind", ["WavLM", "Hubert", "Wav2Vec2", "UniSpeech"])
def test_hugging_face_for_ctc_directory_loads_with_head_and_vocabulary(tmp_path, kind):
    from transformers import Wav2Vec2CTCTokenizer

    letters = "ABCDEFG'"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate(letters)}}
    reference = _hf_ctc_dir(tmp_path / "hf", vocab, kind=kind)
    model = load(tmp_path / "hf")
    assert isinstance(model, CTCModel)
    audio = torch.randn(1, 8000, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        expected = reference(audio).logits
        ours, _ = model(audio)
    assert (ours - expected).abs().max() < 1e-4
    hf_tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = [5, 6, 4, 7, 12, 11]  # A B | C ' G: distinct units, so CTC collapsing does not matter
    assert model.tokenizer.decode(ids) == hf_tokenizer.decode(ids)
    assert not model.tokenizer.lowercase  # an upper-case vocabulary encodes upper-case text


def test_hugging_face_ctc_vocabulary_with_blank_elsewhere_is_refused(tmp_path):
    vocab = {"a": 0, "b": 1, "|": 2, "<pad>": 3}
    _hf_ctc_dir(tmp_path / "hf", vocab)
    with pytest.raises(CheckpointError, match="pad token '<pad>' .* has id 3"):
        load(tmp_path / "hf")


def test_transformers_encodec_directory_loads_as_a_codec(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    from speechlab.checkpoints.hf_codec import HFCodec

    config = EncodecConfig(  # as tests/test_hf_codec.py's small_encodec
        num_filters=4, hidden_size=16, codebook_size=32, num_lstm_layers=1, sampling_rate=16000,
        target_bandwidths=[0.5, 1.0, 2.0],
    )  # fmt: skip
    torch.manual_seed(0)
    reference = EncodecModel(config).eval()
    reference.save_pretrained(tmp_path / "encodec")
    codec = load(tmp_path / "encodec")
    assert isinstance(codec, HFCodec)
    audio = torch.randn(1, 1600, generator=torch.Generator().manual_seed(0)) * 0.1
    codes, _ = codec.encode(audio)
    with torch.no_grad():
        expected = reference.encode(audio[:, None], bandwidth=max(config.target_bandwidths)).audio_codes[0]
    assert torch.equal(codes, expected)


def test_truncated_encodec_weights_are_a_clear_error(tmp_path):
    test_transformers_encodec_directory_loads_as_a_codec(tmp_path)
    weights = tmp_path / "encodec" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "encodec")


# ------------------------------------------------------------------------------------------- the registry


def test_a_registered_reader_is_asked_by_load(tmp_path, monkeypatch):
    import sys
    import types

    module = types.ModuleType("speechlab_test_reader")
    module.detect = lambda path: path.suffix == ".tiny"
    module.read = lambda path: torch.nn.Linear(int(path.read_text()), 1)
    monkeypatch.setitem(sys.modules, "speechlab_test_reader", module)
    monkeypatch.setattr(registry, "_READERS", list(registry._READERS))
    registry.register_reader("tiny", "speechlab_test_reader", "a test format", before="fairseq_pt")
    (tmp_path / "m.tiny").write_text("3")
    assert load(tmp_path / "m.tiny").in_features == 3
    assert [r.name for r in registry.readers()][-2:] == ["tiny", "fairseq_pt"]


def test_unrecognised_sources_say_what_is_readable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no checkpoints/ folder"):
        load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type '.txt'"):
        load(tmp_path / "notes.txt")


@pytest.mark.parametrize("name", ["ctc", "wavlm", "unispeech", "codec"])
def test_every_task_logs_the_metric_its_best_checkpoints_are_ranked_by(batch_and_tokenizer, tmp_path, name):
    import lightning as L

    from speechlab.train import task_monitor

    batch, tokenizer = batch_and_tokenizer
    task = _tasks(tokenizer)[name]
    monitor, _ = task_monitor(task)
    assert monitor is not None, (
        f"{name}: no checkpoint_monitor, so best-k checkpoints and --ckpt_path best fail"
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.validate(task, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert monitor in trainer.callback_metrics


def test_convert_reads_a_ctc_run_checkpoint(runs, tmp_path):
    from speechlab import cli

    root, tasks = runs
    assert cli.main(["convert", str(root / "ctc" / "checkpoints" / "last.ckpt"), str(tmp_path / "out")]) == 0
    model = load(tmp_path / "out")
    assert isinstance(model, CTCModel) and model.tokenizer.units == tasks["ctc"].tokenizer.units
    _same_weights(model, tasks["ctc"].model)


def test_test_with_ckpt_path_best_of_a_run_that_never_validated_is_one_line_and_exit_2(
    runs, tmp_path, capsys
):
    import shutil

    from speechlab.cli import main

    root, tasks = runs
    run = tmp_path / "run"
    shutil.copytree(root / "ctc" / "checkpoints", run / "checkpoints")
    manifest = tmp_path / "m.jsonl"
    row = json.loads((ESPEAK / "manifest.jsonl").read_text().splitlines()[0])
    manifest.write_text(json.dumps({**row, "audio": str(ESPEAK / row["audio"])}) + "\n")
    config = tmp_path / "conf.yaml"
    config.write_text(
        f"trainer: {{default_root_dir: {run}, accelerator: cpu, logger: false, enable_progress_bar: false}}\n"
        "model: {class_path: speechlab.tasks.ctc.CTCTask, init_args: {encoder_overrides: {num_layers: 1}}}\n"
        f"data: {{class_path: speechlab.data.datamodule.SpeechDataModule, init_args: {{train_manifest: {manifest}, "
        f"test_manifest: {manifest}, tokenizer: phoneme}}}}\n"
    )
    assert main(["test", "--config", str(config), "--ckpt_path", "best"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("speechlab test: ") and "no best checkpoint" in err[-1]
