"""Token files: round trip, hostile/corrupt headers refused, codec compatibility, encode/decode commands."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest
import soundfile as sf
import torch

from speechlab.checkpoints.codec_tokens import TokenFileError, TokenInfo, load_tokens, save_tokens
from speechlab.checkpoints.pretrained_dir import load_pretrained_codec, save_pretrained
from speechlab.commands import decode, encode
from speechlab.models.codec import Codec, codec_tiny

DATA = Path(__file__).resolve().parents[1] / "data" / "ljspeech_en"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INFO = TokenInfo(16000, 50.0, 3, 1024, "0123456789abcdef", "speechlab-codec/1", 1000)


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def valid_header(**meta_overrides) -> tuple[dict, bytes]:
    meta = {
        "format": "speechlab-codec-tokens",
        "format_version": "1",
        "sample_rate": "16000",
        "frame_rate": "50.0",
        "n_q": "2",
        "codebook_size": "1024",
        "codebook_hash": "0123456789abcdef",
        "model_version": "speechlab-codec/1",
        "num_samples": "",
    }
    meta.update(meta_overrides)
    data = torch.arange(8, dtype=torch.int16).numpy().tobytes()
    return {"__metadata__": meta, "codes": {"dtype": "I16", "shape": [2, 4], "data_offsets": [0, 16]}}, data


def test_token_file_round_trips_codes_and_header(tmp_path):
    codes = torch.randint(0, 1024, (3, 17))
    path = save_tokens(tmp_path / "a.tokens.safetensors", codes, INFO)
    loaded, info = load_tokens(path)
    assert torch.equal(loaded, codes) and loaded.dtype == torch.int64
    assert info == INFO
    header, data = valid_header()
    codes2, info2 = load_tokens(write_raw(tmp_path / "b", header, data))
    assert codes2.shape == (2, 4) and info2.num_samples is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, d: (h, d, 10**12), "header length"),
        (lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "format": "other"}}, d, None), "format"),
        (
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "sample_rate": "-5"}}, d, None),
            "sample_rate",
        ),
        (lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "n_q": "99999999999"}}, d, None), "n_q"),
        (
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "frame_rate": "nan"}}, d, None),
            "frame_rate",
        ),
        (
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "codebook_hash": "../../x"}}, d, None),
            "codebook_hash",
        ),
        (
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "format_version": "7"}}, d, None),
            "newer",
        ),
        (lambda h, d: ({**h, "codes": {**h["codes"], "shape": [3, 4]}}, d, None), "shape"),
        (  # a well-formed float tensor (a corrupt one is already refused by the safetensors checks)
            lambda h, d: (
                {**h, "codes": {**h["codes"], "dtype": "F32", "data_offsets": [0, 32]}},
                d + d,
                None,
            ),
            "integers",
        ),
        (lambda h, d: (h, d[:-2], None), "truncated"),
        (
            lambda h, d: ({**h, "extra": {"dtype": "I16", "shape": [0], "data_offsets": [16, 16]}}, d, None),
            "exactly one tensor",
        ),
        (lambda h, d: ({k: v for k, v in h.items() if k != "__metadata__"}, d, None), "metadata"),
        (lambda h, d: (h, torch.full((8,), 5000, dtype=torch.int16).numpy().tobytes(), None), "outside"),
    ],
)
def test_hostile_or_corrupt_token_files_are_refused_with_a_clear_error(tmp_path, mutate, message):
    header, data = valid_header()
    header, data, fake_len = mutate(header, data)
    path = write_raw(tmp_path / "bad.tokens.safetensors", header, data)
    if fake_len is not None:  # claim a gigantic header
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", fake_len) + raw[8:])
    with pytest.raises(TokenFileError, match=message) as err:
        load_tokens(path)
    assert str(path) in str(err.value)


def test_garbage_and_missing_files_are_refused(tmp_path):
    (tmp_path / "g").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(TokenFileError, match="JSON"):
        load_tokens(tmp_path / "g")
    (tmp_path / "s").write_bytes(b"abc")
    with pytest.raises(TokenFileError, match="too short"):
        load_tokens(tmp_path / "s")
    with pytest.raises(TokenFileError, match="not found"):
        load_tokens(tmp_path / "missing")


def test_tokens_from_another_codec_are_refused():
    torch.manual_seed(0)
    codec = Codec(codec_tiny()).eval()
    info = TokenInfo.for_codec(codec, 2)
    info.check_compatible(codec)
    other = Codec(codec_tiny()).eval()
    with pytest.raises(TokenFileError, match="codebook_hash"):
        info.check_compatible(other)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    encode.add_parser(subparsers)
    decode.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_encode_and_decode_commands_round_trip_a_manifest(tmp_path):
    from speechlab.data.manifest import read_manifest, write_manifest

    torch.manual_seed(0)
    codec = Codec(codec_tiny())
    codec.train()(torch.randn(2, 8000) * 0.1)
    save_pretrained(codec.eval(), tmp_path / "codec", family="codec")
    items = read_manifest(DATA / "manifest.jsonl")[:3]
    for item, seconds in zip(items, (0.3, 0.45, 0.37), strict=True):  # short, different lengths: padded batch
        item["offset"], item["duration"] = 0.5, seconds
    write_manifest(tmp_path / "in.jsonl", items)

    out = tmp_path / "tokens"
    assert (
        run_cli(
            [
                "encode",
                "--manifest",
                str(tmp_path / "in.jsonl"),
                "--model",
                str(tmp_path / "codec"),
                "--output-dir",
                str(out),
                "--batch-size",
                "3",
                "--units",
                "--n-q",
                "2",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [it["id"] for it in items]
    loaded = load_pretrained_codec(tmp_path / "codec")
    for record, item in zip(records, items, strict=True):
        codes, info = load_tokens(record["tokens"])
        assert info.n_q == 2 and info.codebook_hash == loaded.codebook_hash()
        from speechlab.audio import load_audio

        audio = load_audio(item["audio"], 16000, offset=0.5, duration=item["duration"])
        alone, frames = loaded.encode(audio[None], n_q=2)  # batch of 3 == each alone
        assert torch.equal(codes, alone[0])
        assert record["units"] == " ".join(map(str, alone[0, 0].tolist()))
        assert info.num_samples == audio.shape[0]

    wavs = tmp_path / "wavs"
    assert (
        run_cli(
            [
                "decode",
                "--manifest",
                str(out / "manifest.jsonl"),
                "--model",
                str(tmp_path / "codec"),
                "--output-dir",
                str(wavs),
            ]
        )
        == 0
    )
    for record in records:
        data, rate = sf.read(wavs / f"{record['id']}.wav")
        assert rate == 16000 and data.shape[0] == load_tokens(record["tokens"])[1].num_samples

    torch.manual_seed(5)
    save_pretrained(Codec(codec_tiny()).eval(), tmp_path / "other", family="codec")
    with pytest.raises(TokenFileError, match="different codec"):
        run_cli(
            [
                "decode",
                "--tokens-dir",
                str(out),
                "--model",
                str(tmp_path / "other"),
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
