"""Searching (SIPA section 2.1): the space, the trials, the Ray backend, the stage."""

from sipa_core.search.space import (SPACE_SCHEMA, blocks_from, candidate, create_candidate_spec, hyperopt_space,
                                    smallest_score, stride_options, vals_from_point,
                                    resolution_factor, scaling_of)
from sipa_core.search.stage import SEARCH_SCHEMA, STAGE, read_config, search
from sipa_core.search.trials import (TrialStore, best_of, evaluate_candidate, fitness, hyperopt_trials,
                                     pareto_front, propose, run_step, subset_per_class)

__all__ = ["SEARCH_SCHEMA", "SPACE_SCHEMA", "STAGE", "TrialStore", "best_of", "blocks_from", "candidate",
           "create_candidate_spec", "evaluate_candidate", "fitness", "hyperopt_space", "hyperopt_trials",
           "pareto_front", "propose", "read_config", "run_step", "search", "smallest_score", "stride_options",
           "subset_per_class", "vals_from_point", "resolution_factor", "scaling_of"]
