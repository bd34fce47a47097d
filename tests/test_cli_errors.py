"""Every CLI command: a mistake gives one line saying what is wrong and what to do, exit code 2,
and a traceback only with --debug (checked by subprocess, as a person runs it); every option's
help says its default."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from hfcompress.cli.main import build_parser, main


def _run(*argv, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # a Hub id must fail fast and say so, not hang
    return subprocess.run([sys.executable, "-m", "hfcompress.cli.main", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_cli_missing_model_one_line_by_subprocess(tmp_path):
    proc = _run("quantize", "./no_such_model", "--out", str(tmp_path / "q"), cwd=tmp_path)
    _one_line_error(proc, "hfcompress quantize: error:", "'./no_such_model': no such directory",
                    "pass a model directory")
    assert not (tmp_path / "q").exists()
    # without ./ it could be a Hub id: tried, and the failure is still one line that says what to do
    proc = _run("quantize", "no_such_model", "--out", str(tmp_path / "q"), cwd=tmp_path)
    _one_line_error(proc, "'no_such_model' is neither a local directory nor a Hub repo", "check the name")
    # --debug: the traceback is there
    proc = _run("inspect", str(tmp_path / "missing"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


@pytest.mark.parametrize("argv,needles", [
    (["inspect", "{tmp}/missing"], ["no such directory", "pass a checkpoint"]),
    (["eval", "{tmp}/missing"], ["no such directory"]),
    (["eval", "{tmp}/float", "--text", "{tmp}/none.txt"], ["--text", "is not a file"]),
    (["eval", "{tmp}/float", "--adapter", "{tmp}"], ["--adapter", "has no adapter_config.json"]),
    (["compensate", "{tmp}/float", "--original", "{tmp}/missing", "--out", "{tmp}/a"], ["--original", "no such"]),
    (["compensate", "{tmp}/float", "--original", "{tmp}/float", "--dataset", "{tmp}/none.txt", "--out", "{tmp}/a"],
     ["--dataset", "is not a file"]),
    (["push", "{tmp}/missing", "someone/repo"], ["no such directory"]),
    (["push", "{tmp}", "someone/repo"], ["has no config.json or adapter_config.json"]),
    (["quantize", "{tmp}/float", "--bits", "5", "--out", "{tmp}/q"], ["bits=5 is not supported"]),
    (["quantize", "{tmp}/float", "--stream", "--out", "{tmp}/q"], ["--stream only apply to --method gptq"]),
    (["quantize", "{tmp}/float", "--method", "gptq", "--dataset", "{tmp}/none.txt", "--out", "{tmp}/q"],
     ["--dataset", "is not a file"]),
    (["demo", "--model", "{tmp}/missing"], ["no such directory"]),
])
def test_cli_every_command_one_line(tmp_path, capsys, argv, needles):
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "config.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"hfcompress {argv[0]}: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_cli_help_every_option_has_help_with_default():
    for name, sub in _subparsers(build_parser()).items():
        sub.format_help()  # renders
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            where = f"hfcompress {name} {action.option_strings[-1]}"
            assert action.help, f"{where} has no help line"
            shown = sub._get_formatter()._get_help_string(action)  # what --help prints for it
            if isinstance(action, argparse._StoreTrueAction) or action.required:
                continue  # a flag is off unless given; a required option has no default
            assert "default" in shown, f"{where}: its help does not say its default ({shown!r})"
            if action.default is not None and "default" not in action.help:  # the formatter adds the value
                assert "%(default)" in shown, f"{where}: {shown!r}"


def test_cli_from_the_repo_root_imports_no_foreign_kernels_package():
    """Run from a checkout (``python -m`` puts the current directory first on sys.path), no folder
    of the repository may stand in for a PyPI package: a top-level ``kernels/`` once shadowed the
    ``kernels`` package that bitsandbytes imports at start-up, so the CLI printed bitsandbytes'
    "cannot import name 'get_kernel' from 'kernels' (<repo>/kernels/__init__.py)"."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    proc = _run("--help", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "usage: hfcompress" in proc.stdout
    assert "get_kernel" not in proc.stderr and os.path.join(root, "kernels") not in proc.stderr, proc.stderr
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s else None)"], capture_output=True, text=True, cwd=root, timeout=60)
    found = probe.stdout.strip()
    assert found == "None" or not found.startswith(root), f"`import kernels` from the repo root finds {found}"
