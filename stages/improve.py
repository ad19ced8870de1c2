"""DVC stage ``improve``: greedy selection of training techniques, then the final training."""

from sipa_core.cli_stage import stage_main
from sipa_core.improve import improve, read_config


def summary(cfg, m):
    base = f", base recipe {m['base_accuracy']:.4f}" if "base_accuracy" in m else ""
    return f"improve: adopted {m['adopted']}; test accuracy {m['accuracy']:.4f}{base}; score {m['score']:.6f}"


if __name__ == "__main__":
    stage_main(__doc__, read_config, improve, summary)
