"""The pipeline's stages in order: one registry of the ``Stage`` objects that
the scripts in ``stages/`` run and that ``sipa check-params`` checks.

(A stage script imports its own stage module, not this registry, so that the
code DVC tracks for a stage is the code that stage runs.)
"""

from __future__ import annotations

from sipa_core.accelerate.stage import STAGE as ACCELERATE
from sipa_core.data.prepare import STAGE as PREPARE
from sipa_core.improve.stage import STAGE as IMPROVE
from sipa_core.prune.stage import STAGE as PRUNE
from sipa_core.report import STAGE as REPORT
from sipa_core.search.stage import STAGE as SEARCH
from sipa_core.stage_runner import Stage

STAGES: dict[str, Stage] = {s.name: s for s in (PREPARE, SEARCH, IMPROVE, PRUNE, ACCELERATE, REPORT)}


def check_params(path: str) -> list[str]:
    """Check every stage's section of a params file (schemas, recipes, schedules);
    the first problem is a SipaError naming the file and key."""
    for stage in STAGES.values():
        stage.read_config(path)
    return list(STAGES)
