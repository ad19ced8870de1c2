"""DVC stage ``prune``: iterative pruning rounds on the improving stage's checkpoint."""

from sipa_core.cli_stage import stage_main
from sipa_core.prune import prune, read_config


def summary(cfg, m):
    if m["passthrough"]:
        return (f"prune: no round kept the accuracy requirement; the input model passes through "
                f"(accuracy {m['accuracy']:.4f}, score {m['score']:.6f})")
    return (f"prune: round {m['chosen_round']}/{m['rounds']} chosen, sparsity {m['sparsity']:.3f}; "
            f"test accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f}); score {m['score']:.6f} "
            f"(input {m['input_score']:.6f})")


if __name__ == "__main__":
    stage_main(__doc__, read_config, prune, summary)
