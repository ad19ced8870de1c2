"""The quantizing stage (beyond the paper): quantization-aware training of the
accelerated network, then its exit decided on again.

Place in the pipeline: after accelerating. The stage reads the network with
its exit, folds BatchNorm, quantizes every conv and linear layer at the
widths of ``quantize`` (weights per output channel, inputs per tensor),
keeps the pruning masks, trains the main network (QAT), then the exit on the
frozen quantized main network (``training.py``), and keeps the exit or drops
it, its threshold chosen again on the validation split by the exit rule the
accelerate stage recorded in the exit (``width_run.py``). Why after, not
before accelerating: the exit is then trained and calibrated on the
quantized network, as the counted score requires, and trying other widths
(``dvc exp run -S quantize.weight_bits=4``) re-runs this stage only, not the
exit search. ``compare_widths`` trains other widths the same way for the
accuracy against score plot; ``layer_widths: allocated`` chooses each
layer's width under a budget (``allocate.py``). The chosen network is
exported to ONNX and run by onnxruntime (``export.py``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from sipa_core.accelerate.exits import simulate
from sipa_core.accelerate.record import ExitRecord
from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.lineage import input_lineage, refuse_trained_split
from sipa_core.prune.masks import sparsity
from sipa_core.quantize.allocate import ALLOCATION_COLUMNS, Allocation, allocate_widths, allocation_metrics
from sipa_core.quantize.config import ELEMENTWISE_BITS, inactive, parse_label, read_config, widths_of
from sipa_core.quantize.export import drop_stale_onnx, export_and_check, write_onnx
from sipa_core.quantize.qat import check_widths
from sipa_core.quantize.record import QuantRecord
from sipa_core.quantize.training import QAT_RECIPE, QuantRun
from sipa_core.quantize.width_run import WidthResult, quantize_at
from sipa_core.resume import file_digest
from sipa_core.runtime import provenance
from sipa_core.stage_common import load_data, load_input_model
from sipa_core.stage_runner import Stage
from sipa_core.train.evaluation import SplitReader, accuracy
from sipa_core.train.recipe import check_recipe, speed_settings

WIDTH_COLUMNS = ["widths", "weight_bits", "act_bits", "val_accuracy", "accuracy", "exit_ratio", "threshold",
                 "params_bytes", "ops", "score", "score_tree", "chosen"]
KEY_FIELDS = ("exit_epochs", "calibration_batches", "act_quantizers", "output_bits", "fuse_relu", "weight_scale",
              "scale_lr", "schedule")


def start_run(cfg: dict, params_file: str, progress) -> QuantRun:
    """The run on the input checkpoint, every width checked against its layers, quantizers fitted."""
    where = f"{params_file}: quantize"
    data = load_data(cfg["data"], f"{where}.data")
    main, ckpt = load_input_model(Path(cfg["model"]), data, f"{where}.model", "accelerate")
    names = [n for n, _ in main.named_modules()]
    try:
        for widths in [cfg["widths"]] + [widths_of(cfg, *parse_label(label)) for label in cfg["compare_widths"]]:
            check_widths(widths, names)
        exit_record = ExitRecord.of(ckpt)
    except SipaError as err:
        raise SipaError(f"{params_file}: {err}") from None
    lineage = input_lineage(ckpt.lineage, data, f"{where}.model", cfg["model"])
    if exit_record is not None:
        if len(data.val_y) == 0:
            raise SipaError(f"{where}: the exit threshold is chosen on the validation split, but prepare.val_size is 0")
        refuse_trained_split("val", lineage, f"{where} (the exit threshold is calibrated on val)", cfg["model"])
    recipe = check_recipe({**QAT_RECIPE, **speed_settings(ckpt.recipe), **cfg["recipe"],
                           "epochs": cfg["epochs"], "seed": cfg["seed"]}, file=params_file, section="quantize.recipe")
    key = {"input": file_digest(cfg["model"]), "data": data.source, "recipe": recipe,
           **{k: cfg[k] for k in KEY_FIELDS},
           **({"schedule_epochs": cfg["schedule_epochs"]} if cfg["schedule"] else {})}
    run = QuantRun(cfg, SplitReader(data, recipe["eval_batch_size"]), main, exit_record, recipe, lineage, key,
                   params_file, progress)
    run.fit_quantizers()
    return run


def input_accuracy(run: QuantRun) -> float:
    """The floating-point input network's test accuracy at its own threshold, run at 16 bits (as the
    accelerate stage scores it under the 16-bit freebie)."""
    main_logits = run.splits.logits(run.main, "test", fp16=True)
    if run.exit_record is None:
        return accuracy(main_logits, run.splits.labels("test"))
    pred, _ = simulate(run.splits.logits(run.float_exit_net(), "test", fp16=True), main_logits,
                       run.exit_record.threshold)
    return accuracy(pred, run.splits.labels("test"))


def width_row(result: WidthResult, chosen: bool) -> dict:
    f, w, kept = result.final, result.widths, result.kept
    return {"widths": f"W{w.weight}A{w.act}", "weight_bits": w.weight, "act_bits": w.act,
            "val_accuracy": f.val_accuracy, "accuracy": f.accuracy, "exit_ratio": kept.exit_ratio if kept else 0.0,
            "threshold": kept.threshold if kept else None, "params_bytes": f.summary["params_bytes"],
            "ops": f.summary["ops"], "score": f.summary["score"], "score_tree": f.summary["score_tree"],
            "chosen": "yes" if chosen else "no"}


def stage_metrics(run: QuantRun, result: WidthResult, baseline: float) -> dict:
    """The stage's metrics: the chosen width's network against its floating-point input."""
    final, kept, decision = result.final, result.kept, result.decision
    main_fp32 = accuracy(run.splits.logits(result.main, "test"), run.splits.labels("test"))
    out = {**final.summary, "accuracy": final.accuracy, "val_accuracy": final.val_accuracy,
           "main_accuracy": result.main_figures.accuracy, "input_accuracy": baseline, "main_accuracy_fp32": main_fp32,
           "accuracy_change": final.accuracy - baseline, "threshold": kept.threshold if kept else None,
           "exit_ratio": kept.exit_ratio if kept else 0.0, "val_exit_ratio": kept.val_exit_ratio if kept else 0.0,
           "val_target": decision.target if decision else None, "exit_kept": kept is not None,
           "elementwise_bits": ELEMENTWISE_BITS, "widths": result.widths.label(),
           "input_sparsity": sparsity(run.main), "sparsity": sparsity(result.main)}
    if decision is not None and decision.passthrough_reason:
        out["exit_dropped_reason"] = decision.passthrough_reason
    return out


def save_result(run: QuantRun, result: WidthResult) -> None:
    """The chosen network's checkpoint: its quantization record, and the kept exit's record."""
    kept = result.kept
    record = QuantRecord(result.widths, run.quantizers, run.exit_widths(result.widths) if kept else None,
                         run.exit_quantizers if kept else None)
    records = {"quant": record}
    if kept is not None:
        records["exit"] = replace(run.exit_record, state=kept.net.exit.state_dict(), threshold=kept.threshold,
                                  exit_ratio=kept.exit_ratio)
    save_model(run.cfg["out"], result.main, recipe=run.recipe, stage="quantize", lineage=run.lineage,
               records=records)


def quantize(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    run = start_run(cfg, params_file, progress)
    baseline = input_accuracy(run)
    allocation: Allocation | None = allocate_widths(run) if cfg["layer_widths"] == "allocated" else None
    main_widths = cfg["widths"] if allocation is None else \
        replace(cfg["widths"], overrides=tuple((n, b, b) for n, b in allocation.widths.items()))
    results = [quantize_at(run, main_widths)]
    results += [quantize_at(run, widths_of(cfg, *parse_label(label))) for label in cfg["compare_widths"]]
    chosen = results[0]
    metrics = {**stage_metrics(run, chosen, baseline), **allocation_metrics(allocation)}
    kept = chosen.kept
    onnx_files, onnx_metrics = export_and_check(chosen.main, kept.net if kept else None,
                                                kept.threshold if kept else None, run.data,
                                                chosen.final.test_predictions, Path(cfg["state"]) / "onnx")
    metrics.update(onnx_metrics)
    with publishing(cfg["metrics"]):
        save_result(run, chosen)
        atomic_write_csv(cfg["table"], [width_row(r, r is chosen) for r in results], WIDTH_COLUMNS)
        atomic_write_csv(cfg["allocation"], allocation.rows() if allocation else [], ALLOCATION_COLUMNS)
        write_onnx(Path(cfg["onnx"]), onnx_files)
    drop_stale_onnx(Path(cfg["onnx"]), onnx_files)
    metrics.update(provenance(seed=cfg["seed"], device=run.recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


def summary(cfg: dict, m: dict) -> str:
    exit_text = (f"exit at threshold {m['threshold']:.2f}, {m['exit_ratio']:.1%} of test images leave"
                 if m["exit_kept"] else "no exit")
    return (f"quantize: {m['widths']}: accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f} against the "
            f"float input), {exit_text}; sparsity {m['input_sparsity']:.1%} -> {m['sparsity']:.1%}; "
            f"score {m['score']:.6f}")


STAGE = Stage("quantize", __doc__, read_config, quantize, summary, inactive)
