"""DVC stage ``prepare``: decode the data source once into train/val/test uint8 tensors."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code (also a queued experiment's copy)

from sipa_core.data.prepare import STAGE
from sipa_core.stage_runner import stage_main

if __name__ == "__main__":
    stage_main(STAGE)
