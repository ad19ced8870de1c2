"""DVC stage ``accelerate``: an early exit on the pruned network, its threshold calibrated on validation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code (also a queued experiment's copy)

from sipa_core.accelerate.stage import STAGE
from sipa_core.stage_runner import stage_main

if __name__ == "__main__":
    stage_main(STAGE)
