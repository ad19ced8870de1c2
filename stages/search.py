"""DVC stage ``search``: hyperopt search of block arguments and scaling coefficients (or a preset)."""

from sipa_core.cli_stage import stage_main
from sipa_core.search import read_config, search

if __name__ == "__main__":
    stage_main(__doc__, read_config, search,
               lambda cfg, m: f"search ({m['method']}, {m['trials']} trials): accuracy {m['accuracy']:.4f}, "
                              f"score {m['score']:.6f} -> {cfg['out_arch']}")
