"""speechlab.data.manifest: the bundled corpora load, every kind of bad line is a clear error or a counted skip."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from speechlab.data.manifest import ManifestError, SkipReport, read_manifest, write_manifest
from speechlab.data.text import CharTokenizer

SHARED_CORPORA = Path("/work/shared/corpora")


@pytest.mark.parametrize("name", ["espeak", "ljspeech_en", "noise_opensfx"])
def test_bundled_corpora_load_as_they_are_with_absolute_audio_paths(data_dir, name):
    path = data_dir / name / "manifest.jsonl"
    items = read_manifest(path, check_audio="header")
    assert len(items) == sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for item in items:
        assert os.path.isabs(item["audio"]) and os.path.isfile(item["audio"])
    assert "license" in items[0]  # unknown fields are kept


@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="shared corpora not on this machine")
def test_shared_corpora_load_as_they_are():
    for path in sorted(SHARED_CORPORA.glob("*/manifest.jsonl")):
        assert read_manifest(path, check_audio="header"), path


def test_required_text_is_accepted_where_present_and_speech_corpora_have_it(espeak_manifest):
    items = read_manifest(espeak_manifest, require=("text", "phonemes"))
    assert all(item["text"] and item["phonemes"] for item in items)


def _bad_lines(corpus) -> dict:
    """name -> (manifest lines, 1-based line of the bad one, reason, field) — each with one problem."""
    good = corpus.add("good", seconds=0.5)
    other = corpus.add("other", seconds=0.5, text="")
    audio_dir = corpus.root / "audio"
    (audio_dir / "empty.flac").write_bytes(b"")
    (audio_dir / "text.flac").write_text("not audio at all")
    outside = corpus.root.parent / "outside.flac"
    outside.write_bytes((audio_dir / "good.flac").read_bytes())
    g = json.dumps(good)
    cases = {
        "missing_file": [{**good, "id": "x", "audio": "audio/nope.flac"}],
        "zero_byte": [{**good, "id": "x", "audio": "audio/empty.flac"}],
        "non_audio": [{**good, "id": "x", "audio": "audio/text.flac"}],
        "duration_mismatch": [{**good, "id": "x", "duration": 2.5, "num_samples": 8000}],
        "num_samples_mismatch": [{**good, "id": "x", "num_samples": 12345}],
        "sample_rate_mismatch": [{**good, "id": "x", "sample_rate": 8000}],
        "offset_beyond_end": [{**good, "id": "x", "offset": 3.0, "duration": 0.1}],
        "segment_past_end": [{**good, "id": "x", "offset": 0.25, "duration": 1.0}],
        "empty_text": [other],
        "missing_text": [{k: v for k, v in good.items() if k != "text"} | {"id": "x"}],
        "missing_id": [{k: v for k, v in good.items() if k != "id"}],
        "missing_duration": [{k: v for k, v in good.items() if k != "duration"} | {"id": "x"}],
        "duration_as_string": [{**good, "id": "x", "duration": "0.5"}],
        "negative_duration": [{**good, "id": "x", "duration": -1}],
        "text_as_number": [{**good, "id": "x", "text": 5}],
        "bad_units": [{**good, "id": "x", "units": "1 2 three"}],
        "malformed_json": ['{"id": "x", "audio": "audio/good.flac", "duration": 0.5'],
        "not_an_object": ['["x", "audio/good.flac", 0.5]'],
        "duplicate_id": [dict(good)],
        "non_utf8": [g[:-1].encode() + b', "speaker": "Jos\xe9"}'],
        "outside_root": [{**good, "id": "x", "audio": "../outside.flac"}],
    }
    expected = {
        "missing_file": ("missing_file", "audio"),
        "zero_byte": ("unreadable_audio", "audio"),
        "non_audio": ("unreadable_audio", "audio"),
        "duration_mismatch": ("duration_mismatch", "duration"),
        "num_samples_mismatch": ("duration_mismatch", "num_samples"),
        "sample_rate_mismatch": ("sample_rate_mismatch", "sample_rate"),
        "offset_beyond_end": ("duration_mismatch", "offset"),
        "segment_past_end": ("duration_mismatch", "duration"),
        "empty_text": ("empty_field", "text"),
        "missing_text": ("empty_field", "text"),
        "missing_id": ("missing_field", "id"),
        "missing_duration": ("missing_field", "duration"),
        "duration_as_string": ("wrong_type", "duration"),
        "negative_duration": ("wrong_type", "duration"),
        "text_as_number": ("wrong_type", "text"),
        "bad_units": ("wrong_type", "units"),
        "malformed_json": ("malformed_json", None),
        "not_an_object": ("not_object", None),
        "duplicate_id": ("duplicate_id", "id"),
        "non_utf8": ("not_utf8", None),
        "outside_root": ("outside_root", "audio"),
    }
    # the bad line is line 3: a good line, a blank line (ignored, but counted for line numbers), the bad one
    return {name: ([good, "", *lines], 3, *expected[name]) for name, lines in cases.items()}


BAD_CASES = [
    "missing_file", "zero_byte", "non_audio", "duration_mismatch", "num_samples_mismatch", "sample_rate_mismatch",
    "offset_beyond_end", "segment_past_end", "empty_text", "missing_text", "missing_id", "missing_duration",
    "duration_as_string", "negative_duration", "text_as_number", "bad_units", "malformed_json", "not_an_object",
    "duplicate_id", "non_utf8", "outside_root",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_line_raises_manifest_error_naming_path_line_and_field(tmp_corpus, case):
    lines, line_no, reason, field = _bad_lines(tmp_corpus)[case]
    path = tmp_corpus.write(lines)
    with pytest.raises(ManifestError) as err:
        read_manifest(path, require=("text",))
    assert err.value.reason == reason
    assert err.value.line == line_no and err.value.field == field
    message = str(err.value)
    assert message.startswith(f"{path}:{line_no}: ")
    if field:
        assert f"field '{field}'" in message
    assert " -> " in message  # says what to do


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_line_with_skip_policy_is_dropped_counted_and_logged(tmp_corpus, case, caplog):
    lines, _, reason, _ = _bad_lines(tmp_corpus)[case]
    path = tmp_corpus.write(lines)
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="speechlab.data.manifest"):
        items = read_manifest(path, require=("text",), on_error="skip", report=report)
    assert [it["id"] for it in items] == ["good"]
    assert report.counts == {reason: 1} and report.kept == 1 and report.lines == 2
    assert len(caplog.records) == 1 and f"{reason}=1" in caplog.records[0].getMessage()


def test_unreadable_permissions_are_a_manifest_error(tmp_corpus, monkeypatch):
    line = tmp_corpus.add("locked")
    path = tmp_corpus.write()
    locked = str(tmp_corpus.root / line["audio"])
    real_access = os.access
    # chmod 000 does not stop root; deny through os.access, which the reader consults
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked else real_access(p, mode))
    with pytest.raises(ManifestError, match="not readable") as err:
        read_manifest(path)
    assert err.value.reason == "unreadable_file" and err.value.line == 1
    report = SkipReport()
    assert read_manifest(path, on_error="skip", report=report) == [] and report.counts == {
        "unreadable_file": 1
    }


def test_unknown_unit_found_by_a_validate_hook_names_the_line(tmp_corpus):
    tmp_corpus.add("a", text="abc")
    tmp_corpus.add("b", text="abz")
    path = tmp_corpus.write()
    tokenizer = CharTokenizer.build(["abc"])
    with pytest.raises(ManifestError, match="'z'") as err:
        read_manifest(path, validate=lambda item: tokenizer.encode(item["text"]))
    assert (err.value.line, err.value.field, err.value.reason) == (2, "text", "unknown_unit")
    report = SkipReport()
    items = read_manifest(
        path, validate=lambda item: tokenizer.encode(item["text"]), on_error="skip", report=report
    )
    assert [it["id"] for it in items] == ["a"] and report.counts == {"unknown_unit": 1}


def test_relative_path_outside_the_folder_is_allowed_on_request_and_absolute_paths_always(tmp_corpus):
    good = tmp_corpus.add("good")
    outside = tmp_corpus.root.parent / "outside.flac"
    outside.write_bytes((tmp_corpus.root / good["audio"]).read_bytes())
    path = tmp_corpus.write([{**good, "audio": "../outside.flac"}])
    assert read_manifest(path, allow_outside=True)[0]["audio"] == str(outside)
    path = tmp_corpus.write([{**good, "audio": str(outside)}])
    assert read_manifest(path)[0]["audio"] == str(outside)


def test_check_audio_levels_trade_thoroughness_for_speed(tmp_corpus):
    good = tmp_corpus.add("good")
    (tmp_corpus.root / "audio" / "text.flac").write_text("not audio")
    path = tmp_corpus.write([{**good, "audio": "audio/text.flac"}])
    with pytest.raises(ManifestError):
        read_manifest(path, check_audio="header")
    assert len(read_manifest(path, check_audio="exists")) == 1
    path = tmp_corpus.write([{**good, "audio": "audio/missing.flac"}])
    with pytest.raises(ManifestError):
        read_manifest(path, check_audio="exists")
    assert len(read_manifest(path, check_audio="none")) == 1


def test_duration_tolerance_is_configurable(tmp_corpus):
    line = tmp_corpus.add("a", seconds=0.5)
    path = tmp_corpus.write([{**line, "duration": 0.53, "num_samples": 8000}])
    assert read_manifest(path)  # within the default 0.05 s
    with pytest.raises(ManifestError, match="duration"):
        read_manifest(path, duration_tolerance=0.01)


def test_segments_of_a_longer_file_are_valid(tmp_corpus):
    line = tmp_corpus.add("long", seconds=2.0)
    base = {k: v for k, v in line.items() if k != "num_samples"}
    path = tmp_corpus.write([{**base, "id": "s1", "offset": 0.0, "duration": 1.0},
                             {**base, "id": "s2", "offset": 1.0, "duration": 1.0}])  # fmt: skip
    assert [it["offset"] for it in read_manifest(path)] == [0.0, 1.0]


def test_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.jsonl")


def test_write_manifest_round_trips_with_relative_paths_and_no_temp_files(tmp_corpus, tmp_path):
    tmp_corpus.add("a", text="héllo wörld", speaker="s1", extra={"k": [1, 2]})
    tmp_corpus.add("b")
    items = read_manifest(tmp_corpus.write())
    elsewhere = tmp_path / "elsewhere.flac"
    elsewhere.write_bytes(Path(items[1]["audio"]).read_bytes())
    items[1] = {**items[1], "audio": str(elsewhere)}
    out = tmp_corpus.root / "copy.jsonl"
    write_manifest(out, items)
    raw = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert raw[0]["audio"] == "audio/a.flac" and raw[1]["audio"] == str(elsewhere)
    assert "héllo" in out.read_text(encoding="utf-8")  # not \u-escaped
    assert read_manifest(out) == items
    assert sorted(p.name for p in tmp_corpus.root.iterdir()) == ["audio", "copy.jsonl", "manifest.jsonl"]
    assert items[0]["audio"].startswith("/")  # the caller's items are not modified


def test_write_manifest_leaves_the_old_file_intact_when_an_item_cannot_be_written(tmp_corpus):
    path = tmp_corpus.write([tmp_corpus.add("a")])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_manifest(path, [{"id": "b", "audio": "x.flac", "duration": 1.0, "bad": np.zeros(2)}])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_corpus.root.iterdir()) == ["audio", "manifest.jsonl"]


def _cli(argv):
    import argparse

    from speechlab.commands import check_manifest

    parser = argparse.ArgumentParser(prog="speechlab")
    check_manifest.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_manifest_command_reports_bad_lines_and_writes_a_clean_copy(tmp_corpus, capsys):
    tmp_corpus.add("good")
    bad = tmp_corpus.add("trunc", signal=np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32))
    path = tmp_corpus.root / bad["audio"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    manifest = tmp_corpus.write(
        [*tmp_corpus.lines, {**tmp_corpus.lines[0], "id": "gone", "audio": "audio/x.flac"}]
    )
    assert _cli(["check-manifest", str(manifest)]) == 1  # header level: only the missing file
    assert "missing_file=1" in capsys.readouterr().out
    assert _cli(["check-manifest", str(manifest), "--decode", "--write-clean", ".clean.jsonl"]) == 1
    out = capsys.readouterr().out
    assert "undecodable_audio=1" in out and "missing_file=1" in out
    clean = tmp_corpus.root / "manifest.clean.jsonl"
    assert [it["id"] for it in read_manifest(clean)] == ["good"]
    assert _cli(["check-manifest", str(clean), "--decode", "--require", "text"]) == 0


def test_a_byte_order_mark_and_windows_line_endings_are_accepted(tmp_corpus):
    a, b = tmp_corpus.add("a"), tmp_corpus.add("b")
    path = tmp_corpus.root / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(a) + "\r\n" + json.dumps(b) + "\r\n").encode())
    assert [it["id"] for it in read_manifest(path)] == ["a", "b"]
