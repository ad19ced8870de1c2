"""Shared fixtures."""

import os
from pathlib import Path

import pytest


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
