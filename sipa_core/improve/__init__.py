"""Improving (SIPA section 2.2): the techniques, their greedy selection, the stage."""

from sipa_core.improve.runs import TrialRunner
from sipa_core.improve.stage import IMPROVE_SCHEMA, STAGE, improve, read_config, write_table
from sipa_core.improve.techniques import (CATEGORIES, OPTIONS_SCHEMA, PAPER_ADOPTED, PAPER_BASE, TECHNIQUES, Decision,
                                          Technique, apply_techniques, greedy_select, ordered)

__all__ = ["CATEGORIES", "Decision", "IMPROVE_SCHEMA", "OPTIONS_SCHEMA", "PAPER_ADOPTED", "PAPER_BASE", "STAGE",
           "TECHNIQUES", "Technique", "TrialRunner", "apply_techniques", "greedy_select", "improve", "ordered",
           "read_config", "write_table"]
