"""The Accelerating stage (SIPA section 2.4, Appendix A.4): early exit.

For each candidate position an exit module is trained on the frozen main
network (softsmoothing or cross-entropy loss; ``training.py``). The exit and
main logits of the validation and test splits are cached, so choosing a
threshold needs no new forward pass (``selection.py``). The (position,
threshold) pair is chosen on the validation split only, by the exit rule
(``rule.py``): the lowest MicroNet score whose validation accuracy meets the
target, and no exit when none lowers the score. Test accuracy and exit ratio
are then reported at that choice, the real adaptive forward checked against
the simulated predictions, and the two losses compared at the chosen place
(``compare.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

from sipa_core.accelerate.compare import LossComparison, compare_losses
from sipa_core.accelerate.config import inactive, read_config
from sipa_core.accelerate.record import ExitRecord
from sipa_core.accelerate.rule import ExitRule, MainNetwork, decide
from sipa_core.accelerate.selection import (EXIT_TABLE_COLUMNS, exit_metrics, passthrough_metrics, sweep_positions,
                                            table_rows)
from sipa_core.accelerate.training import ExitTrainer, exit_recipe
from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.lineage import input_lineage, refuse_trained_split
from sipa_core.models import split
from sipa_core.resume import file_digest
from sipa_core.runtime import provenance
from sipa_core.stage_common import load_data, load_input_model, score_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train.evaluation import SplitReader, accuracy


def _load_main(cfg: dict, params_file: str):
    """Data and the frozen main network, checked against the positions."""
    where = f"{params_file}: accelerate"
    data = load_data(cfg["data"], f"{where}.data")
    main, ckpt = load_input_model(Path(cfg["model"]), data, f"{where}.model", "pruning")
    try:
        blocks = split.boundaries(main)
    except SipaError as err:
        raise SipaError(f"{where}.model: {err}") from None
    last = len(blocks) - 2
    names = {b.name: b.index for b in blocks}
    unknown = [p for p in cfg["positions"] if isinstance(p, str) and names.get(p, last + 1) > last]
    if unknown:
        raise SipaError(f"{where}.positions: {unknown[0]!r} is not a block an exit can follow; this network's are "
                        f"{', '.join(b.name for b in blocks[:-1])}")
    cfg["positions"] = [names[p] if isinstance(p, str) else p for p in cfg["positions"]]
    bad = [p for p in cfg["positions"] if p > last]
    if bad:
        raise SipaError(f"{where}.positions: block {bad[0]} is past the last place an exit can go "
                        f"(this network has blocks 0..{last + 1}; an exit goes after 0..{last})")
    if len(data.val_y) == 0:
        raise SipaError(f"{where}: the threshold is chosen on the validation split, but prepare.val_size is 0")
    main.eval()
    for p in main.parameters():
        p.requires_grad_(False)
    return data, main, ckpt


def start_trainer(cfg: dict, params_file: str, progress) -> tuple[ExitTrainer, object]:
    """The exit trainer on the input network, its main logits cached; (trainer, input checkpoint)."""
    data, main, ckpt = _load_main(cfg, params_file)
    lineage = input_lineage(ckpt.lineage, data, f"{params_file}: accelerate.model", cfg["model"])
    refuse_trained_split("val", lineage, f"{params_file}: accelerate.thresholds (calibrated on val)", cfg["model"])
    recipe = exit_recipe(cfg, ckpt.recipe, params_file)
    key_base = {"input": file_digest(cfg["model"]), "data": data.source, "recipe": recipe, "bits": cfg["bits"],
                "width": cfg["width"], "kernel": cfg["kernel"], "update_main_bn": cfg["update_main_bn"],
                "exit_schedule": cfg["exit_schedule"], "exit_prune_epochs": cfg["exit_prune_epochs"],
                "exit_stabilize": [cfg["exit_stabilize_epochs"], cfg["exit_stabilize_lr"]],
                "splits": list(lineage.splits)}
    trainer = ExitTrainer(cfg, SplitReader(data, recipe["eval_batch_size"]), main, recipe, key_base, lineage,
                          progress)
    trainer.load_main_logits()
    return trainer, ckpt


def accelerate(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    trainer, ckpt = start_trainer(cfg, params_file, progress)
    reader, rule = trainer.splits, ExitRule.from_config(cfg)
    main = MainNetwork(accuracy(trainer.main_logits["val"], reader.labels("val")),
                       accuracy(trainer.main_logits["test"], reader.labels("test")),
                       score_metrics(trainer.main, reader.data, cfg["bits"]))
    table = sweep_positions(trainer)
    decision = decide(table.candidates, rule, main)
    chosen = decision.chosen
    metrics = {"main_accuracy": main.test_accuracy, "main_val_accuracy": main.val_accuracy,
               "score_without_exit": main.score["score"], "loss": cfg["loss"], **decision.metrics()}
    final_model, record, comparison = trainer.main, None, LossComparison.empty(cfg["loss"])
    if chosen is None:
        metrics.update(passthrough_metrics(main))
    else:
        trained = table.exits[chosen.position]
        path_accuracy = table.rows[(chosen.position, chosen.threshold)]["path_accuracy"]
        metrics.update(exit_metrics(trainer, trained, chosen, path_accuracy, main))
        final_model = trained.net.main
        record = ExitRecord(trained.net.exit_cfg, trained.net.exit.state_dict(), chosen.threshold,
                            metrics["exit_ratio"], cfg["loss"], rule)
        comparison = compare_losses(trainer, trained, decision.target)
        metrics.update(comparison.metrics)
    with publishing(cfg["metrics"]):
        save_model(cfg["out"], final_model, masks=ckpt.masks, recipe=trainer.recipe, stage="accelerate",
                   lineage=trainer.lineage, records={"exit": record} if record is not None else None)
        atomic_write_csv(cfg["risk_coverage"], comparison.rows, comparison.columns)
        atomic_write_csv(cfg["table"], table_rows(table, cfg["table_thresholds"], chosen), EXIT_TABLE_COLUMNS)
    metrics.update(provenance(seed=cfg["seed"], device=trainer.recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


def summary(cfg: dict, m: dict) -> str:
    if m["passthrough"]:
        return (f"accelerate: {m['passthrough_reason']}; the main network passes through "
                f"(accuracy {m['accuracy']:.4f}, score {m['score']:.6f})")
    return (f"accelerate: exit after block {m['exit_position']} at threshold {m['threshold']:.2f}: "
            f"{m['exit_ratio']:.1%} of test images exit; accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f}); "
            f"ops -{m['ops_saving']:.1%}; score {m['score']:.6f} (without exit {m['score_without_exit']:.6f})")


STAGE = Stage("accelerate", __doc__, read_config, accelerate, summary, inactive)
