"""Bad input never becomes silent garbage, a memory bomb, or a write outside the run (issue 16).

Every test builds its bad file for real (no mocks); ``docs/bad_data.md`` lists each case with the test proving it.
"""

from __future__ import annotations

import json

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
