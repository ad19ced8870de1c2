"""Shared fixtures."""

import os
import runpy
import sys
from pathlib import Path

import pytest

from sipa_core.cli import main


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """The real CIFAR-10-as-JPEG image folder named by $SIPA_CIFAR10_JPEG, or skip."""
    value = os.environ.get("SIPA_CIFAR10_JPEG")
    if not value:
        pytest.skip("SIPA_CIFAR10_JPEG is not set (point it at the cifar10-jpeg image folder)")
    path = Path(value)
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        pytest.skip(f"SIPA_CIFAR10_JPEG={value}: no train/ and test/ folders there")
    return path


@pytest.fixture(scope="session")
def cifar100_binary() -> Path:
    """The official CIFAR-100 binary files (train.bin, test.bin, label names) in the folder named by
    $SIPA_CIFAR100_BINARY, or skip."""
    value = os.environ.get("SIPA_CIFAR100_BINARY")
    if not value:
        pytest.skip("SIPA_CIFAR100_BINARY is not set (point it at the cifar-100-binary folder)")
    path = Path(value)
    if not (path / "train.bin").is_file() or not (path / "test.bin").is_file():
        pytest.skip(f"SIPA_CIFAR100_BINARY={value}: no train.bin and test.bin there")
    return path


@pytest.fixture
def run_script(capsys, monkeypatch):
    """Run a stage script (or ``-m sipa_core.cli``) in this process, as its
    ``__main__``: the same argument parsing, checks and exit status as a
    subprocess, without a second interpreter's start-up. Returns (status, stdout, stderr)."""

    def run(script, *args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        code = 0
        try:
            if script == "sipa":
                code = main(list(map(str, args))) or 0
            else:
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
