"""DVC stage ``report``: the paper's Table 1 for this run and metrics/summary.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code (also a queued experiment's copy)

from sipa_core.report import STAGE
from sipa_core.stage_runner import stage_main

if __name__ == "__main__":
    stage_main(STAGE)
