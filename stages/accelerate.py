"""DVC stage ``accelerate``: an early exit on the pruned network, its threshold calibrated on validation."""

from sipa_core.accelerate import accelerate, read_config
from sipa_core.cli_stage import stage_main


def summary(cfg, m):
    if m["passthrough"]:
        return (f"accelerate: {m['passthrough_reason']}; the main network passes through "
                f"(accuracy {m['accuracy']:.4f}, score {m['score']:.6f})")
    return (f"accelerate: exit after block {m['exit_position']} at threshold {m['threshold']:.2f}: "
            f"{m['exit_ratio']:.1%} of test images exit; accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f}); "
            f"ops -{m['ops_saving']:.1%}; score {m['score']:.6f} (without exit {m['score_without_exit']:.6f})")


if __name__ == "__main__":
    stage_main(__doc__, read_config, accelerate, summary)
