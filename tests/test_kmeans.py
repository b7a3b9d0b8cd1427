import json
from pathlib import Path

import pytest
import torch

from speechlab.audio import mfcc_features
from speechlab.cli import main
from speechlab.data.dataset import AudioDataset, parse_units
from speechlab.data.manifest import read_manifest
from speechlab.models.ssl_encoder import SSLEncoder
from speechlab.models.wavlm import wavlm_base, wavlm_tiny
from speechlab.nn.kmeans import KMeans, KMeansConfig
from speechlab.tasks.units import align_frames, encoder_frame_count, load_item_audio, mfcc_frame_features

DATA = Path(__file__).resolve().parents[1] / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(num_clusters=8, per_cluster=500, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(num_clusters, dim, generator=gen)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=gen), labels, centres


def test_recovers_well_separated_synthetic_clusters():
    x, labels, centres = _blobs()
    km = KMeans(KMeansConfig(num_clusters=8, batch_size=512, seed=1)).fit(x)
    predicted = km.predict(x)
    # a one-to-one map between true and found clusters, every point on the right side of it
    mapping = torch.stack([predicted[labels == c].mode().values for c in range(8)])
    assert len(set(mapping.tolist())) == 8
    assert torch.equal(mapping[labels], predicted)
    # and the centroids sit on the true centres
    torch.testing.assert_close(km.centroids[mapping], centres, atol=0.1, rtol=0)
    assert km.inertia == pytest.approx(5 * 0.3**2, rel=0.15)


def test_centroids_round_trip_through_safetensors(tmp_path):
    x, _, _ = _blobs(num_clusters=4, per_cluster=100)
    km = KMeans(KMeansConfig(num_clusters=4, batch_size=128)).fit(x)
    km.save(tmp_path / "centroids.safetensors", {"features": "test"})
    loaded = KMeans.load(tmp_path / "centroids.safetensors")
    assert torch.equal(loaded.centroids, km.centroids)
    assert loaded.metadata["features"] == "test"
    assert torch.equal(loaded.predict(x), km.predict(x))


def test_too_few_points_for_the_clusters_is_a_clear_error():
    with pytest.raises(ValueError, match="clusters"):
        KMeans(KMeansConfig(num_clusters=10)).fit(torch.randn(5, 3))


def test_mfcc_frame_2t_has_the_same_window_as_encoder_frame_t():
    audio = torch.randn(16000 * 2 + 123, generator=torch.Generator().manual_seed(0))
    full = mfcc_features(audio)
    assert full.shape[1] == 39
    aligned = mfcc_frame_features(audio)
    frames = int(encoder_frame_count(audio.numel())[0])
    assert aligned.shape == (frames, 39)
    torch.testing.assert_close(aligned, full[::2][:frames])
    # encoder frame t starts at sample 320 t: the MFCC of that 400-sample window alone equals row t
    t = 37
    window = mfcc_features(audio[320 * t : 320 * t + 400])
    torch.testing.assert_close(window[0, :13], aligned[t, :13], atol=1e-3, rtol=1e-4)


def test_align_frames_crops_and_repeats_the_last_frame():
    feats = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(align_frames(feats, 2, stride=2), feats[[0, 2]])
    assert torch.equal(align_frames(feats, 4, stride=2), feats[[0, 2, 4, 4]])


def _subset(manifest: Path, out: Path, count: int) -> Path:
    """The ``count`` shortest and ``count`` longest utterances of a bundled manifest, audio paths absolute."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["num_samples"])
    for row in rows:
        row["audio"] = str(manifest.parent / row["audio"])
    out.mkdir(parents=True)
    path = out / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:count] + rows[-count:]))
    return path


def _check_units_have_encoder_frame_counts(manifests: list[Path], out: Path) -> None:
    args = ["kmeans", "--output-dir", str(out), "--num-clusters", "16", "--max-iter", "5", "--merge", "all"]
    for m in manifests:
        args += ["--manifest", str(m)]
    assert main(args) == 0
    assert (out / "centroids.safetensors").is_file()
    encoder = SSLEncoder(wavlm_tiny()).eval()
    for manifest in manifests:
        original = read_manifest(manifest)
        labelled = read_manifest(out / f"{manifest.parent.name}.jsonl")
        assert [it["id"] for it in labelled] == [it["id"] for it in original]
        num_samples = torch.tensor([load_item_audio(it).numel() for it in original])
        lengths = torch.tensor([len(parse_units(it["units"])) for it in labelled])
        assert torch.equal(lengths, encoder.frame_lengths(num_samples))
        assert all(0 <= u < 16 for it in labelled for u in parse_units(it["units"]))
        # and a real forward pass agrees
        with torch.no_grad():
            audio = load_item_audio(labelled[0])
            frames = encoder(audio[None], torch.tensor([audio.numel()])).frame_lengths
            assert int(frames[0]) == len(parse_units(labelled[0]["units"]))
    assert len(read_manifest(out / "all.jsonl")) == sum(len(read_manifest(m)) for m in manifests)


def test_units_length_equals_the_encoder_frame_count_for_the_shortest_and_longest_utterances(tmp_path):
    manifests = [
        _subset(DATA / "espeak" / "manifest.jsonl", tmp_path / "espeak", 3),
        _subset(DATA / "ljspeech_en" / "manifest.jsonl", tmp_path / "ljspeech_en", 2),
    ]
    _check_units_have_encoder_frame_counts(manifests, tmp_path / "units")


@pytest.mark.slow
def test_units_length_equals_the_encoder_frame_count_for_every_utterance_in_data(tmp_path):
    manifests = [DATA / "espeak" / "manifest.jsonl", DATA / "ljspeech_en" / "manifest.jsonl"]
    _check_units_have_encoder_frame_counts(manifests, tmp_path / "units")


def test_labelled_manifest_round_trips_all_fields_and_loads_as_units(tmp_path):
    small = _subset(DATA / "espeak" / "manifest.jsonl", tmp_path / "small", 3)
    rows = [json.loads(line) for line in small.read_text().splitlines()]
    out = tmp_path / "out"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(small),
                "--output-dir",
                str(out),
                "--num-clusters",
                "8",
                "--merge",
                "lj",
                "--val-fraction",
                "0.34",
            ]
        )
        == 0
    )
    labelled = [json.loads(line) for line in (out / "small.jsonl").read_text().splitlines()]
    for before, after in zip(rows, labelled, strict=True):
        assert {k: v for k, v in after.items() if k not in ("units", "audio")} == {
            k: v for k, v in before.items() if k != "audio"
        }
        assert Path(after["audio"]).resolve() == Path(before["audio"]).resolve()
        assert isinstance(after["units"], str)
    train = read_manifest(out / "lj_train.jsonl", require=("units",))
    val = read_manifest(out / "lj_val.jsonl", require=("units",))
    assert (len(train), len(val)) == (4, 2)
    assert not {it["id"] for it in train} & {it["id"] for it in val}
    item = AudioDataset(train, units_field="units")[0]
    assert len(item["units"]) == int(encoder_frame_count(item["audio"].numel())[0])
    # labelling with the saved centroids reproduces the units exactly
    again = tmp_path / "again"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(small),
                "--output-dir",
                str(again),
                "--centroids",
                str(out / "centroids.safetensors"),
            ]
        )
        == 0
    )
    assert (again / "small.jsonl").read_text() == (out / "small.jsonl").read_text()


def test_every_preset_shares_the_frame_rate_used_for_mfcc_units():
    lengths = torch.tensor([400, 16000, 30669, 51234])
    for config in (wavlm_tiny(), wavlm_base()):
        from speechlab.nn.feature_encoder import conv_output_lengths

        assert torch.equal(conv_output_lengths(lengths, config.conv_layers), encoder_frame_count(lengths))


def test_hidden_layer_units_from_a_hugging_face_wavlm_directory(tmp_path):
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(0)
    config = WavLMConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_buckets=32,
    )
    WavLMModel(config).save_pretrained(tmp_path / "hf")
    small = _subset(DATA / "espeak" / "manifest.jsonl", tmp_path / "small", 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(small),
                "--output-dir",
                str(out),
                "--checkpoint",
                str(tmp_path / "hf"),
                "--layer",
                "1",
                "--num-clusters",
                "4",
                "--max-iter",
                "5",
            ]
        )
        == 0
    )
    for item in read_manifest(out / "small.jsonl", require=("units",)):
        frames = int(encoder_frame_count(load_item_audio(item).numel())[0])
        assert len(parse_units(item["units"])) == frames
