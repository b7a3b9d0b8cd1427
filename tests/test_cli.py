"""The ``speechlab`` command starts fast: no torch / Lightning for --help, --version or the tool list."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from speechlab import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_and_version_import_neither_torch_nor_lightning():
    code = (
        "import sys\n"
        "from speechlab.cli import main\n"
        "for argv in (['--help'], ['--version'], []):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "[]"
    assert any(line.startswith("speechlab 0.") for line in lines)  # --version
    for command in ("fit", "transcribe", "export", "extract", "check-manifest"):
        assert command in result.stdout  # every command listed by --help


def test_help_summaries_match_what_each_tool_registers():
    for module_name in cli.TOOL_MODULES:
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers()
        importlib.import_module(module_name).add_parser(subparsers)
        for action in subparsers._choices_actions:
            assert cli.TOOLS[action.dest] == (module_name, action.help), action.dest
    registered = {a.dest for a in cli._tool_parser()._subparsers._group_actions[0]._choices_actions}
    assert set(cli.TOOLS) <= registered


def test_a_tool_command_imports_only_its_own_module():
    code = (
        "import sys\n"
        "from speechlab.cli import main\n"
        "try:\n"
        "    main(['plot', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('lightning.pytorch.cli' in sys.modules, 'speechlab.commands.transcribe' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stderr


def test_speechlab_cli_class_is_still_importable_from_cli():
    from speechlab.lightning_cli import SpeechLabCLI

    assert cli.SpeechLabCLI is SpeechLabCLI


def test_fit_takes_the_mini_readme_seed_flags_without_lightnings_args_warning():
    """``speechlab fit`` as a user types it: the codec seed flags the mini README prints reach the config, and
    Lightning's "args and command line arguments" warning is not shown."""
    readme = (REPO / "recipes" / "mini" / "README.md").read_text(encoding="utf-8")
    flags = readme.split("The same config with seeds 1 and 2 (`", 1)[1].split("`", 1)[0]
    assert flags == "--seed_everything N --model.init_args.seed N --data.init_args.seed N", flags
    argv = [
        "fit",
        "--config",
        "recipes/mini/conf/codec.yaml",
        *flags.replace("N", "2").split(),
        "--print_config",
    ]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "speechlab"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "seed_everything: 2" in result.stdout and result.stdout.count("    seed: 2") == 2, result.stdout
    assert "args parameter is intended" not in result.stderr, result.stderr
