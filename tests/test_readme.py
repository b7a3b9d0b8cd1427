"""The README shows what the project really runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_feature_extraction_snippet_is_the_tested_one():
    # docs/extract_snippet.py is executed by tests/test_api.py::test_readme_snippet_runs_as_written.
    snippet = (REPO / "docs" / "extract_snippet.py").read_text(encoding="utf-8")
    assert snippet in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in readme


def test_readme_use_a_trained_model_commands_are_valid_commands():
    import shlex

    from speechlab.cli import _tool_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("speechlab ")]
    assert {shlex.split(c)[1] for c in commands} == {"transcribe", "export"}
    parser = _tool_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command.split("#")[0])[1:])  # exits (SystemExit) on a bad option
        assert callable(args.func), command
