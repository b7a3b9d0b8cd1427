"""Bad input never becomes silent garbage, a memory bomb, or a write outside the run (issue 16).

Every test builds its bad file for real (no mocks); ``docs/bad_data.md`` lists each case with the test proving it.
"""

from __future__ import annotations

import json
import re

import pytest

from speechlab import cli

# ------------------------------------------------------------------------------------------- tool error boundary


@pytest.mark.parametrize(
    "argv",
    [
        ["kmeans", "--manifest", "{tmp}/missing.jsonl", "--output-dir", "{tmp}/out"],
        ["check-manifest", "{tmp}/m.jsonl", "--tokenizer-dir", "{tmp}/no_tokenizer"],
        ["extract", "--model", "{tmp}/no_model", "--manifest", "{tmp}/m.jsonl", "--output-dir", "{tmp}/o"],
        ["encode", "--model", "{tmp}/no_codec", "--manifest", "{tmp}/m.jsonl", "--output-dir", "{tmp}/o"],
        ["decode", "--model", "{tmp}/no_codec", "--tokens-dir", "{tmp}", "--output-dir", "{tmp}/o"],
    ],
    ids=["kmeans", "check-manifest", "extract", "encode", "decode"],
)
def test_a_tool_command_failing_on_bad_input_prints_one_line_and_exits_2(argv, tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav", "duration": 1.0}) + "\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"speechlab {argv[0]}: ") and "--debug" in err
    assert str(tmp_path) in err  # names the file it failed on


def test_debug_shows_the_full_traceback(tmp_path):
    from speechlab.data.manifest import ManifestError

    with pytest.raises(ManifestError, match="missing.jsonl"):
        cli.main(
            [
                "kmeans",
                "--manifest",
                str(tmp_path / "missing.jsonl"),
                "--output-dir",
                str(tmp_path),
                "--debug",
            ]
        )


# ------------------------------------------------------------------------- checkpoint tokenizer: no path traversal


def _tiny_ctc_checkpoint(tmp_path, tokenizer_files_extra: dict[str, bytes]):
    import lightning as L
    import torch

    from speechlab.data.text import CharTokenizer
    from speechlab.tasks.ctc import CTCTask

    task = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    task.build(CharTokenizer.build(["a cab", "bad"]))
    checkpoint = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    task.on_save_checkpoint(checkpoint)
    checkpoint["tokenizer_files"].update(tokenizer_files_extra)
    path = tmp_path / "run" / "crafted.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return CTCTask, task, path


def _escapes(tmp_path) -> dict[str, bytes]:
    """Entry names that the old restore (``tmpdir / name``) turned into files in ``tmp_path``."""
    climb = "../" * 40 + str(tmp_path / "escaped_relative.txt").lstrip("/")
    return {climb: b"relative", str(tmp_path / "escaped_absolute.txt"): b"absolute"}


def test_a_checkpoint_naming_paths_in_tokenizer_files_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    before = sorted(p for p in tmp_path.rglob("*"))
    task_class, _, path = _tiny_ctc_checkpoint(tmp_path, _escapes(tmp_path))
    written = sorted(set(tmp_path.rglob("*")) - set(before))
    monkeypatch.chdir(path.parent)
    with pytest.raises(ValueError, match=r"unexpected entries.*escaped"):
        task_class.load_from_checkpoint(path, weights_only=True)  # what a resume or a fine-tuning run does
    import speechlab

    with pytest.raises(ValueError, match=r"crafted.ckpt.*unexpected entries"):
        speechlab.load(path)  # the Lightning .ckpt reader restores the tokenizer the same way
    assert sorted(set(tmp_path.rglob("*")) - set(before)) == written  # only the .ckpt and its folder
    assert (
        not (tmp_path / "escaped_relative.txt").exists() and not (tmp_path / "escaped_absolute.txt").exists()
    )


def test_unispeech_checkpoint_with_path_names_in_tokenizer_files_is_refused(tmp_path):
    import torch

    from speechlab.data.text import PhonemeTokenizer, tokenizer_to_files
    from speechlab.tasks.unispeech import UniSpeechTask

    checkpoint = {
        "num_ctc_classes": 5,
        "tokenizer_files": tokenizer_to_files(PhonemeTokenizer(["a", "b", "c"])),
    }
    checkpoint["tokenizer_files"].update(_escapes(tmp_path))
    fresh = UniSpeechTask(num_ctc_classes=5)
    with pytest.raises(ValueError, match="unexpected entries"):
        fresh.on_load_checkpoint(torch.load(_save(tmp_path, checkpoint), weights_only=True))
    assert not list(tmp_path.glob("escaped_*"))


def _save(tmp_path, obj):
    import torch

    path = tmp_path / "x.ckpt"
    torch.save(obj, path)
    return path


def test_a_checkpoint_carries_its_tokenizer_in_memory_round_trip(tmp_path):
    from speechlab.data.text import (
        PhonemeTokenizer,
        SentencePieceTokenizer,
        load_tokenizer,
        tokenizer_from_files,
        tokenizer_to_files,
    )

    task_class, task, path = _tiny_ctc_checkpoint(tmp_path, {})
    restored = task_class.load_from_checkpoint(path, weights_only=True)
    assert restored.tokenizer.units == task.tokenizer.units
    assert restored.tokenizer.encode("a cab") == task.tokenizer.encode("a cab")

    texts = ["the cat sat on the mat", "a dog ran in the park", "speech is sound"] * 20
    spm = SentencePieceTokenizer.build(texts, vocab_size=30)
    for tokenizer in (spm, PhonemeTokenizer(["a", "b"])):
        files = tokenizer_to_files(tokenizer)
        tokenizer.save(tmp_path / type(tokenizer).__name__)  # the files save() writes are the same bytes
        on_disk = {p.name: p.read_bytes() for p in (tmp_path / type(tokenizer).__name__).iterdir()}
        assert files == on_disk
        back = tokenizer_from_files(files)
        assert back.units == tokenizer.units == load_tokenizer(tmp_path / type(tokenizer).__name__).units


def test_a_units_json_naming_another_model_path_is_refused(tmp_path):
    from speechlab.data.text import (
        SentencePieceTokenizer,
        load_tokenizer,
        tokenizer_from_files,
        tokenizer_to_files,
    )

    spm = SentencePieceTokenizer.build(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=20)
    files = tokenizer_to_files(spm)
    config = json.loads(files["units.json"])
    config["model"] = "../../secret.model"
    files["units.json"] = json.dumps(config).encode()
    with pytest.raises(ValueError, match="model file must be 'spm.model'"):
        tokenizer_from_files(files)
    folder = spm.save(tmp_path / "tok")
    (folder / "units.json").write_bytes(files["units.json"])
    with pytest.raises(ValueError, match="secret.model"):
        load_tokenizer(folder)


# ------------------------------------------------------------------------------------ audio sanity at read time

_BOUNDED_RESAMPLE = """
import resource, sys
import numpy as np
from speechlab.audio import load_audio

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

load_audio(sys.argv[1])  # warm up torch / torchaudio / scipy imports and allocators (a 44.1 kHz file)
limit = vm_bytes() + 1024**3  # 1 GiB more address space; the sinc kernel for 16001 Hz needs ~5 GB
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[2:]:
    wave = load_audio(path)
    print(path, wave.numel(), float(wave.abs().max()))
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _sine_wav(
    path, rate: int, samples: int, frequency: float = 440.0, subtype: str = "PCM_16", container: str = "WAV"
):
    import numpy as np
    import soundfile as sf

    t = np.arange(samples) / rate
    wave = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    sf.write(path, wave, rate, subtype=subtype, format=container)
    return path


def test_odd_header_rates_resample_with_bounded_memory_and_keep_the_signal(tmp_path):
    import os
    import subprocess
    import sys

    warm = _sine_wav(tmp_path / "warm.wav", 44100, 4410)
    odd = [_sine_wav(tmp_path / f"r{rate}.wav", rate, 1500) for rate in (16001, 44101, 8191)]
    assert all(p.stat().st_size < 3200 for p in odd)  # 3 KB files
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _BOUNDED_RESAMPLE, str(warm), *map(str, odd)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split("\n")
    for path, rate, line in zip(odd, (16001, 44101, 8191), lines, strict=False):
        name, numel, peak = line.split()
        assert name == str(path) and abs(int(numel) - 1500 * 16000 / rate) <= 1
        assert 0.45 < float(peak) < 0.55  # the sine survives (no garbage, no blow-up)
    grew_mb = int(lines[len(odd)].split()[1]) / 1024
    assert grew_mb < 300


def test_the_bounded_resampler_matches_the_ideal_signal():
    import numpy as np
    import torch

    from speechlab.audio import MAX_SINC_KERNEL_ELEMENTS, resample, sinc_kernel_elements

    assert sinc_kernel_elements(16001, 16000) > MAX_SINC_KERNEL_ELEMENTS  # takes the polyphase path
    assert sinc_kernel_elements(44100, 16000) < MAX_SINC_KERNEL_ELEMENTS  # the usual rates keep torchaudio
    t = np.arange(16001) / 16001
    out = resample(torch.from_numpy(np.sin(2 * np.pi * 440 * t).astype(np.float32)), 16001, 16000)
    ideal = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert out.dtype == torch.float32 and out.numel() == 16000
    assert np.abs(out.numpy()[200:-200] - ideal[200:-200]).max() < 1e-3


@pytest.mark.parametrize("rate", [1, 999, 1_000_000])
def test_a_header_sample_rate_outside_the_bounds_is_an_audio_error(tmp_path, rate):
    from speechlab.audio import AudioError, audio_info, load_audio
    from speechlab.data.manifest import ManifestError, read_manifest

    path = _sine_wav(tmp_path / "odd.wav", rate, 1500, frequency=rate / 10)
    for read in (audio_info, load_audio):
        with pytest.raises(AudioError, match=rf"odd.wav: header sample rate {rate} Hz is outside"):
            read(path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "odd.wav", "duration": 1500 / rate}) + "\n")
    with pytest.raises(ManifestError, match="m.jsonl:1: field 'audio'.*sample rate"):
        read_manifest(manifest)


@pytest.mark.parametrize("value", [1e30, 3e4, -500.0])
def test_float_samples_of_absurd_amplitude_are_an_audio_error_naming_the_file(tmp_path, value):
    import numpy as np
    import soundfile as sf

    from speechlab.audio import AudioError, load_audio

    data = np.full(1600, 0.1, dtype=np.float32)
    data[100:110] = value
    sf.write(tmp_path / "loud.wav", data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"loud.wav: 10 samples beyond \+-100"):
        load_audio(tmp_path / "loud.wav")


def test_float_samples_a_little_over_full_scale_still_load(tmp_path):
    import numpy as np
    import soundfile as sf

    from speechlab.audio import load_audio

    data = np.full(1600, 1.5, dtype=np.float32)
    sf.write(tmp_path / "hot.wav", data, 16000, subtype="FLOAT")
    assert float(load_audio(tmp_path / "hot.wav").max()) == 1.5


@pytest.mark.parametrize("subtype, container", [("PCM_16", "WAV"), ("FLOAT", "WAV"), ("PCM_24", "WAVEX")])
def test_a_wav_whose_data_is_cut_short_of_its_header_is_an_error_not_a_shorter_clip(
    tmp_path, subtype, container
):
    import soundfile as sf

    from speechlab.audio import AudioError, audio_info, load_audio
    from speechlab.data.manifest import read_manifest

    full = _sine_wav(tmp_path / "full.wav", 16000, 16000, subtype=subtype, container=container)
    assert sf.info(str(full)).format == container
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert sf.info(str(cut)).frames < 16000  # libsndfile silently reports only the frames present
    for read in (audio_info, load_audio):
        with pytest.raises(
            AudioError, match=r"cut.wav: the WAV header declares 16000 frames but the file holds"
        ):
            read(cut)
    manifest = tmp_path / "m.jsonl"
    lines = [{"id": n, "audio": f"{n}.wav", "duration": 1.0} for n in ("full", "cut")]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from speechlab.data.manifest import SkipReport

    report = SkipReport()
    kept = read_manifest(manifest, on_error="skip", report=report)
    assert [it["id"] for it in kept] == ["full"] and report.counts == {"unreadable_audio": 1}


def test_a_streamed_wav_with_an_unknown_data_size_still_loads(tmp_path):
    import struct

    from speechlab.audio import load_audio

    path = _sine_wav(tmp_path / "stream.wav", 16000, 8000)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"data")
    raw[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)  # what a writer to a pipe leaves in the header
    path.write_bytes(bytes(raw))
    assert load_audio(path).numel() == 8000


# ------------------------------------------------------------------------------ non-finite outputs are failures


def _overflowing_encoder_dir(tmp_path):
    """A saved encoder whose weights are finite but whose features overflow to NaN/inf."""
    import torch
    from test_api import tiny_encoder

    from speechlab.checkpoints.pretrained_dir import save_pretrained

    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.feature_projection.weight.mul_(1e30)
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
    return save_pretrained(encoder, tmp_path / "model", family="wavlm")


def _two_utterances(tmp_path):
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        sf.write(tmp_path / f"u{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        lines.append({"id": f"u{i}", "audio": f"u{i}.wav", "duration": 0.5})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


@pytest.mark.parametrize("layout", [[], ["--shard-size", "2"], ["--chunk-seconds", "0.2"]])
def test_extract_never_writes_non_finite_features_as_done(tmp_path, capsys, layout):
    model, manifest, out = _overflowing_encoder_dir(tmp_path), _two_utterances(tmp_path), tmp_path / "out"
    argv = ["extract", "--model", str(model), "--manifest", str(manifest), "--output-dir", str(out)]
    argv += ["--no-progress", "--context-seconds", "0.1", *layout]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "u0.wav: id 'u0':" in err and "feature values are NaN/inf; nothing was written" in err
    assert not list(out.glob("u*")) and not list(out.glob("shard-*"))
    assert cli.main([*argv, "--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "extracted 0 utterances" in printed and "2 skipped after errors" in printed
    assert not list(out.glob("u*.npy"))
    for shard in out.glob("shard-*"):  # a shard may be written, holding none of the failed items
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as handle:
            assert json.loads(handle.metadata()["ids"]) == [] and not list(handle.keys())


def test_encode_refuses_a_non_finite_codec_latent_and_writes_no_tokens(tmp_path, capsys):
    import torch

    from speechlab.checkpoints.pretrained_dir import save_pretrained
    from speechlab.models.codec import Codec, codec_tiny

    torch.manual_seed(0)
    codec = Codec(codec_tiny()).eval()
    with torch.no_grad():  # finite weights whose encoder overflows
        for name, param in codec.named_parameters():
            if name.startswith("encoder.") and name.endswith("original0"):
                param.mul_(1e20)
    save_pretrained(codec, tmp_path / "codec", family="codec")
    manifest, out = _two_utterances(tmp_path), tmp_path / "tokens"
    argv = [
        "encode",
        "--manifest",
        str(manifest),
        "--model",
        str(tmp_path / "codec"),
        "--output-dir",
        str(out),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "encoding ids ['u0', 'u1']" in err and "codec latent is NaN/inf for batch rows [0, 1]" in err
    assert not list(out.glob("*.tokens.safetensors")) and not (out / "manifest.jsonl").exists()


def test_nan_weights_are_a_clear_error_when_a_pretrained_dir_or_a_ckpt_is_loaded(tmp_path):
    import torch
    from test_api import tiny_encoder

    import speechlab
    from speechlab.checkpoints.pretrained_dir import save_pretrained
    from speechlab.checkpoints.safe_load import CheckpointError

    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.feature_projection.weight[0, :3] = float("nan")
    directory = save_pretrained(encoder, tmp_path / "model", family="wavlm")
    with pytest.raises(CheckpointError, match=r"NaN/inf values.*feature_projection.weight \(3 of \d+\)"):
        speechlab.load(directory)

    _, task, path = _tiny_ctc_checkpoint(tmp_path, {})
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["model.head.weight"][0, 0] = float("inf")
    torch.save(checkpoint, path)
    with pytest.raises(
        CheckpointError, match=r"(?s)crafted.ckpt: checkpoint weights hold NaN/inf.*head.weight \(1 of"
    ):
        speechlab.load(path)


def test_nan_kmeans_centroids_are_refused_on_load_and_never_label(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from speechlab.nn.kmeans import KMeans

    centroids = torch.randn(4, 39)
    centroids[2, 5] = float("nan")
    save_file({"centroids": centroids}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"nan.safetensors: centroids: 1 of 156 values are NaN/inf"):
        KMeans.load(tmp_path / "nan.safetensors")
    manifest, out = _two_utterances(tmp_path), tmp_path / "units"
    argv = ["kmeans", "--manifest", str(manifest), "--output-dir", str(out)]
    assert cli.main([*argv, "--centroids", str(tmp_path / "nan.safetensors")]) == 2
    assert "nan.safetensors: centroids: 1 of 156 values are NaN/inf" in capsys.readouterr().err
    assert not (out / "m.jsonl").exists()


def test_kmeans_fit_refuses_non_finite_features_naming_the_item(tmp_path, capsys):
    import torch

    from speechlab.nn.kmeans import KMeans, KMeansConfig

    x = torch.randn(100, 8)
    x[7, 3] = float("inf")
    with pytest.raises(ValueError, match="k-means fit features: 1 of 800 values are NaN/inf"):
        KMeans(KMeansConfig(num_clusters=4)).fit(x)
    model, manifest = _overflowing_encoder_dir(tmp_path), _two_utterances(tmp_path)
    argv = ["kmeans", "--manifest", str(manifest), "--output-dir", str(tmp_path / "units")]
    assert cli.main([*argv, "--checkpoint", str(model), "--layer", "1", "--num-clusters", "2"]) == 2
    assert "id 'u0' (" in capsys.readouterr().err
    assert not (tmp_path / "units" / "centroids.safetensors").exists()


# ------------------------------------------------------------------------------------------------ config bombs

_CONFIG_BOMB = """
import resource, sys, time
import speechlab
from speechlab.checkpoints.safe_load import CheckpointError

# Linux can report a forked parent's peak as the child's own ru_maxrss, so the test reads the growth of the peak.
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    speechlab.load(sys.argv[1])
except CheckpointError as err:
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    print("refused", time.perf_counter() - start, peak_growth)
    print(str(err).replace(chr(10), " "))
"""


def test_a_conv_feature_layers_bomb_is_refused_without_expanding_it(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    spec = "[(1,1,1)]*(10000)*(10000)"  # 10^8 tuples (~8 GB) if evaluated
    cfg = {"conv_feature_layers": spec, "encoder_layers": 1, "encoder_embed_dim": 32}
    torch.save({"cfg": cfg, "model": {}}, tmp_path / "bomb.pt")
    run = subprocess.run(
        [sys.executable, "-c", _CONFIG_BOMB, str(tmp_path / "bomb.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    status, message = run.stdout.splitlines()
    _, seconds, peak_growth_kb = status.split()
    assert float(seconds) < 5 and int(peak_growth_kb) < 2 * 1024**2  # no 8 GB list was built
    assert "bomb.pt" in message and "conv_feature_layers: a repetition to 1 x 10000 items" in message


@pytest.mark.parametrize(
    "spec",
    ["[(1,1,1)]*10000", "[(1,1,1)]*(60)+[(1,1,1)]*(60)", "(1,)*1000", "9" * 20 + "*[(1,1,1)]", "[" * 3000],
)
def test_conv_feature_layers_specs_are_bounded_while_parsed(spec):
    from speechlab.checkpoints.unilm import parse_conv_feature_layers

    with pytest.raises(ValueError, match="cfg conv_feature_layers"):
        parse_conv_feature_layers(spec)


def test_kmeans_checkpoint_goes_through_the_config_limits(tmp_path, capsys):
    import lightning as L
    import torch

    checkpoint = {
        "state_dict": {},
        "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {
            "_class_path": "speechlab.tasks.wavlm_pretrain.WavLMPretrainTask",
            "encoder": "wavlm_tiny",
            "encoder_overrides": {
                "num_layers": 200,
                "hidden_size": 16384,
                "num_heads": 16,
                "ffn_size": 16384,
            },
        },
    }
    torch.save(checkpoint, tmp_path / "huge.ckpt")
    manifest = _two_utterances(tmp_path)
    argv = ["kmeans", "--manifest", str(manifest), "--output-dir", str(tmp_path / "u")]
    assert cli.main([*argv, "--checkpoint", str(tmp_path / "huge.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "huge.ckpt: num_layers=200, hidden_size=16384 means" in err and "refusing to allocate" in err


# ------------------------------------------------------------------------------- CTC targets longer than frames


def test_ctc_feasibility_is_exactly_where_the_ctc_loss_is_infinite():
    import torch
    import torch.nn.functional as F

    from speechlab.tasks.ctc import ctc_feasible

    gen = torch.Generator().manual_seed(0)
    batch, max_units, vocab = 64, 8, 3  # a small vocabulary makes repeated units common
    target_lengths = torch.randint(1, max_units + 1, (batch,), generator=gen)
    targets = torch.randint(1, vocab, (batch, max_units), generator=gen)
    targets[torch.arange(max_units)[None] >= target_lengths[:, None]] = -100
    frame_lengths = torch.randint(1, 2 * max_units, (batch,), generator=gen)
    log_probs = torch.randn(int(frame_lengths.max()), batch, vocab, generator=gen).log_softmax(-1)
    losses = F.ctc_loss(
        log_probs, targets.clamp_min(0), frame_lengths, target_lengths, reduction="none", zero_infinity=False
    )
    feasible = ctc_feasible(targets, target_lengths, frame_lengths)
    assert torch.equal(feasible, torch.isfinite(losses)) and 0 < int(feasible.sum()) < batch


def _ctc_batch(tmp_path, texts_and_seconds):
    import numpy as np
    import soundfile as sf

    from speechlab.audio import load_audio
    from speechlab.data.collate import collate
    from speechlab.data.text import CharTokenizer

    tokenizer = CharTokenizer.build([text for text, _ in texts_and_seconds])
    rng = np.random.default_rng(0)
    items = []
    for i, (text, seconds) in enumerate(texts_and_seconds):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        items.append(
            {"id": f"c{i}", "audio": load_audio(path), "targets": tokenizer.encode(text), "text": text}
        )
    return collate(items), tokenizer


def test_ctc_targets_longer_than_the_frames_are_counted_as_skipped_and_reported(tmp_path, caplog):
    import torch

    from speechlab.tasks.ctc import CTC_TOO_LONG, CTCTask, ctc_feasible

    # 0.1 s gives 4 frames: too few for 9 characters; the 1 s utterance (49 frames) is fine
    batch, tokenizer = _ctc_batch(tmp_path, [("ab", 1.0), ("abcabcabc", 0.1), ("abc", 1.0)])
    task = CTCTask(encoder="wavlm_tiny", encoder_overrides={"num_layers": 1})
    task.build(tokenizer)
    loss = task.training_step(batch, 0)
    assert loss is not None and torch.isfinite(loss)
    assert task.training_step(batch, 1) is not None
    task.eval()  # no dropout: the loss can be recomputed
    loss, logits, frame_lengths = task._ctc_loss(batch)
    per_utterance = torch.nn.functional.ctc_loss(
        logits.float().log_softmax(-1).transpose(0, 1),
        batch.targets.clamp_min(0),
        frame_lengths,
        batch.target_lengths,
        reduction="none",
        zero_infinity=True,
    )
    assert torch.equal(frame_lengths, task.model.encoder.frame_lengths(batch.lengths))  # what training counts
    assert ctc_feasible(batch.targets, batch.target_lengths, frame_lengths).tolist() == [True, False, True]
    assert per_utterance[1] == 0  # zero_infinity zeroed the infeasible one
    # normalised by the feasible utterances' units only (2 + 3), not all 14
    assert torch.isclose(loss, per_utterance.sum() / 5)
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["speechlab_skipped"]["items"] == {CTC_TOO_LONG: 2}
    with caplog.at_level("WARNING"):
        task.on_train_end()
    assert f"training skipped 2 items (2 {CTC_TOO_LONG}" in caplog.text
    assert (
        f"2 training items left out of the loss ({CTC_TOO_LONG}) -> their transcripts need more"
        in caplog.text
    )


def test_unispeech_counts_labeled_utterances_whose_phones_outnumber_the_frames(tmp_path, caplog):
    from speechlab.tasks.ctc import CTC_TOO_LONG
    from speechlab.tasks.unispeech import UniSpeechTask

    batch, tokenizer = _ctc_batch(tmp_path, [("ab", 1.0), ("abcabcabc", 0.1)])
    task = UniSpeechTask(model="unispeech_tiny", num_ctc_classes=tokenizer.vocab_size, num_negatives=2)
    parts = task.compute_losses(batch)
    assert int(parts[CTC_TOO_LONG]) == 1 and parts["num_labeled"] == 2
    assert task.training_step(batch, 0) is not None
    with caplog.at_level("WARNING"):
        task.on_train_end()
    assert f"training skipped 1 items (1 {CTC_TOO_LONG}" in caplog.text


# ---------------------------------------------------------------------------------------- output name collisions


def test_output_names_are_safe_and_refuse_collisions_naming_both_ids():
    from speechlab.data.manifest import output_names

    assert output_names(["utt1", "spk/utt 1", "./b", "x//y", ".hidden"]) == [
        "utt1",
        "spk/utt_1",
        "b",
        "x/y",
        "hidden",
    ]
    for ids in (["a", "./a"], ["a b", "a_b"], ["a:b", "a?b"], ["x/y", "x//y"]):
        with pytest.raises(
            ValueError, match=re.escape(f"m.jsonl: ids {ids[0]!r} and {ids[1]!r} both map to")
        ):
            output_names(ids, source="m.jsonl")
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        output_names(["a", "a"])
    for bad in ("../x", "a/../../x", "/etc/passwd", "", "..."):
        with pytest.raises(ValueError, match="cannot name an output file"):
            output_names([bad])


def test_extract_refuses_ids_that_collide_as_file_names_before_writing(tmp_path, capsys):
    from test_api import tiny_encoder

    from speechlab.checkpoints.pretrained_dir import save_pretrained

    model = save_pretrained(tiny_encoder(), tmp_path / "model", family="wavlm")
    manifest = _two_utterances(tmp_path)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[1]["id"] = "./u0"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    argv = ["extract", "--model", str(model), "--manifest", str(manifest), "--output-dir", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 2
    assert "ids 'u0' and './u0' both map to the output file name 'u0'" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.npy"))


def test_decode_refuses_colliding_ids_and_keeps_sub_folders_apart(tmp_path, capsys):
    import shutil

    import torch

    from speechlab.checkpoints.pretrained_dir import save_pretrained
    from speechlab.models.codec import Codec, codec_tiny

    torch.manual_seed(0)
    save_pretrained(Codec(codec_tiny()).eval(), tmp_path / "codec", family="codec")
    manifest, tokens = _two_utterances(tmp_path), tmp_path / "tokens"
    codec = ["--model", str(tmp_path / "codec")]
    assert cli.main(["encode", "--manifest", str(manifest), *codec, "--output-dir", str(tokens)]) == 0
    records = [json.loads(line) for line in (tokens / "manifest.jsonl").read_text().splitlines()]
    records[0]["id"], records[1]["id"] = "a b", "a_b"
    (tmp_path / "dec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    wavs = tmp_path / "wavs"
    assert (
        cli.main(["decode", "--manifest", str(tmp_path / "dec.jsonl"), *codec, "--output-dir", str(wavs)])
        == 2
    )
    assert "ids 'a b' and 'a_b' both map to the output file name 'a_b'" in capsys.readouterr().err
    assert not wavs.exists() or not list(wavs.rglob("*.wav"))

    # the same file name in two sub-folders: two utterances, two outputs (the bare file name used to collide)
    (tokens / "sub").mkdir()
    shutil.copy(tokens / "u1.tokens.safetensors", tokens / "sub" / "u0.tokens.safetensors")
    assert cli.main(["decode", "--tokens-dir", str(tokens), *codec, "--output-dir", str(wavs)]) == 0
    assert sorted(p.relative_to(wavs).as_posix() for p in wavs.rglob("*.wav")) == [
        "sub/u0.wav",
        "u0.wav",
        "u1.wav",
    ]


# ------------------------------------------------------------------------------ NaN / negative numeric config values


@pytest.mark.parametrize(
    "yaml_line, field",
    [
        ("max_batch_seconds: .nan", "data.max_batch_seconds must be a number > 0, got nan"),
        ("max_batch_seconds: -5", "data.max_batch_seconds must be a number > 0, got -5"),
        ("max_batch_size: 0", "data.max_batch_size must be an integer >= 1, got 0"),
        ("min_duration: .inf", "data.min_duration must be a number >= 0, got inf"),
        ("num_workers: 1.5", "data.num_workers must be an integer, got 1.5"),
    ],
)
def test_nan_or_negative_data_config_values_name_the_field(tmp_path, yaml_line, field):
    import yaml

    from speechlab.data.datamodule import SpeechDataModule

    manifest = _two_utterances(tmp_path)
    (tmp_path / "data.yaml").write_text(f"train_manifest: {manifest}\n{yaml_line}\n")
    with pytest.raises(ValueError, match=re.escape(field)):
        SpeechDataModule(**yaml.safe_load((tmp_path / "data.yaml").read_text()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_layers": -1}, "SSLEncoderConfig.num_layers must be an integer >= 0, got -1"),
        ({"hidden_size": 0}, "SSLEncoderConfig.hidden_size must be an integer >= 1, got 0"),
        ({"dropout": float("nan")}, "SSLEncoderConfig.dropout must be a number >= 0 and <= 1, got nan"),
        ({"layerdrop": 1.5}, "SSLEncoderConfig.layerdrop must be a number >= 0 and <= 1, got 1.5"),
        ({"layer_norm_eps": 0.0}, "SSLEncoderConfig.layer_norm_eps must be a number > 0, got 0.0"),
        (
            {"conv_layers": [(32, 10, 0)]},
            "SSLEncoderConfig.conv_layers[0] must be (channels, kernel, stride) >= 1",
        ),
        ({"num_heads": True}, "SSLEncoderConfig.num_heads must be an integer, got True"),
    ],
)
def test_nan_or_negative_encoder_config_values_name_the_field(overrides, message):
    from speechlab.models.registry import build_config

    with pytest.raises(ValueError, match=re.escape(message)):
        build_config("ssl_encoder", "wavlm_tiny", overrides)


def test_a_checkpoint_with_a_negative_layer_count_is_refused_naming_the_field(tmp_path):
    import lightning as L
    import torch

    import speechlab
    from speechlab.checkpoints.safe_load import CheckpointError

    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": {
                "_class_path": "speechlab.tasks.wavlm_pretrain.WavLMPretrainTask",
                "encoder": "wavlm_tiny",
                "encoder_overrides": {"num_layers": -1},
            },
        },
        tmp_path / "neg.ckpt",
    )
    with pytest.raises(
        CheckpointError, match=r"neg.ckpt.*SSLEncoderConfig.num_layers must be an integer >= 0"
    ):
        speechlab.load(tmp_path / "neg.ckpt")


# --------------------------------------------------------------------------------------------------- catalogue


def test_every_test_the_catalogue_names_exists():
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    rows = [r for r in (tests.parent / "docs" / "bad_data.md").read_text().splitlines() if r.startswith("| ")]
    named, missing = 0, []
    for row in rows:
        current = None
        for match in re.finditer(r"`(test_\w+\.py)?::(test_\w+)", row):
            current = match.group(1) or current
            named += 1
            if current is None or f"def {match.group(2)}(" not in (tests / current).read_text():
                missing.append(f"{current}::{match.group(2)}")
    assert named > 50 and not missing


def _flac_claiming(path, total_samples: int):
    """A real 1 s FLAC whose STREAMINFO header claims ``total_samples``."""
    import numpy as np
    import soundfile as sf

    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    raw = bytearray(path.read_bytes())
    at = 8 + 10  # 'fLaC', metadata block header, then 10 bytes of block / frame sizes
    bits = int.from_bytes(raw[at : at + 8], "big")
    bits = (bits & ~((1 << 36) - 1)) | total_samples  # the low 36 bits hold the total sample count
    raw[at : at + 8] = bits.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    return path


_HUGE_HEADER = """
import resource, sys
from speechlab.audio import AudioError, load_audio

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 1024**3, resource.RLIM_INFINITY))
try:
    load_audio(sys.argv[1])
    print("loaded")
except AudioError as err:
    print("AudioError", err)
"""


def test_a_header_promising_days_of_audio_in_a_small_file_is_an_error_not_a_huge_allocation(tmp_path):
    import os
    import subprocess
    import sys

    import soundfile as sf

    path = _flac_claiming(tmp_path / "huge.flac", 2**35)  # 24 days: 137 GB if allocated from the header
    assert sf.info(str(path)).frames == 2**35 and path.stat().st_size < 100_000
    run = subprocess.run(
        [sys.executable, "-c", _HUGE_HEADER, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("AudioError") and "huge.flac" in run.stdout


def test_long_files_are_read_block_by_block_with_the_same_samples(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    import speechlab.audio as audio

    path = _sine_wav(tmp_path / "long.wav", 16000, 5500)
    monkeypatch.setattr(audio, "READ_BLOCK_FRAMES", 1000)  # 6 blocks, the last one partial
    expected = sf.read(str(path), dtype="float32")[0]
    assert np.array_equal(audio.load_audio(path).numpy(), expected)
    assert np.array_equal(audio.load_audio(path, offset=0.1).numpy(), expected[1600:])
    cut = tmp_path / "cut.wav"
    cut.write_bytes(path.read_bytes()[:-4000])  # fewer frames than the header: still refused
    with pytest.raises(audio.AudioError, match="cut.wav"):
        audio.load_audio(cut)


@pytest.mark.parametrize("kind", ["encodec", "dac"])
def test_a_transformers_codec_with_a_non_finite_latent_is_refused(tmp_path, kind):
    import torch
    from test_hf_codec import small_dac, small_encodec

    from speechlab.checkpoints.hf_codec import HFCodec

    model, directory = (small_encodec if kind == "encodec" else small_dac)(tmp_path)
    with torch.no_grad():  # finite weights whose encoder overflows
        for param in model.encoder.parameters():
            param.mul_(1e12)
    model.save_pretrained(directory)
    codec = HFCodec.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"codec latent is NaN/inf for batch rows \[0, 1\]"):
        codec.encode(torch.randn(2, 8000) * 0.1)
