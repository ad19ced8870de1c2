"""DVC stage ``report``: the paper's Table 1 for this run and metrics/summary.json."""

from sipa_core.cli_stage import stage_main
from sipa_core.report import read_config, report


def summary(cfg, m):
    return (f"report: {m['final_stage']} accuracy {m['accuracy']:.4f}, score {m['score']:.6f} "
            f"(params {m['params_score']:.6f} + ops {m['ops_score']:.6f}) -> {cfg['table']}, {cfg['summary']}")


if __name__ == "__main__":
    stage_main(__doc__, read_config, report, summary)
