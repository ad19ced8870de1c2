"""The quantizing stage (beyond the paper): quantization-aware training of the
accelerated network, then its exit threshold calibrated again.

Place in the pipeline: after accelerating. The stage reads the network with
its exit, folds BatchNorm, quantizes every conv and linear layer at the
widths of ``quantize`` (weights per output channel, inputs per tensor),
keeps the pruning masks (sparsity cannot change), trains the main network
(QAT, straight-through gradients), then the exit on the frozen quantized
main network, and chooses the exit threshold again on the validation split
by the exit rule the accelerate stage recorded in the exit (``accelerate/rule.py``).
Why after, not before accelerating: the
exit is then trained and calibrated on the quantized network, as the counted
score requires, and trying other widths (``dvc exp run -S
quantize.weight_bits=4``) re-runs this stage only, not the exit search.

The score is counted by the MicroNet rules on the quantized values: each
layer's weights at their width, multiplications at the wider of weight and
activation width, elementwise products (activation functions, SE gate,
pooling) at 16 bits because they are not quantized here, additions at
``add_bits``. ``compare_widths`` trains other widths the same way for the accuracy
against score plot; the checkpoint is the one at ``weight_bits``/``act_bits``.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sipa_core.accelerate.exits import LOSS_FUNCTIONS, EarlyExitNetwork, ExitCost, exit_cost, from_record, simulate
from sipa_core.accelerate.rule import ExitRule, ThresholdPoint, choose, sweep
from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, publish_metrics, publishing
from sipa_core.lineage import input_lineage, refuse_trained_split
from sipa_core.paths import path_fields
from sipa_core.params import Field, check_section, load_yaml, refuse_keys
from sipa_core.prune.masks import apply_masks, masks_from_zeros, sparsity
from sipa_core.quantize.allocate import Allocation, allocate, layer_costs, layer_drops
from sipa_core.quantize.export import OnnxNetwork, export_network, onnx_predictions
from sipa_core.quantize.onnx_integer import FLOAT_KERNELS, INTEGER_KERNELS, integer_kernel_counts
from sipa_core.quantize.qat import (
    calibrate,
    check_widths,
    float_twin,
    fold_batchnorm,
    quantize_modules,
    quantized_layer_count,
)
from sipa_core.quantize.quantizers import (
    ACT_QUANTIZERS,
    WEIGHT_SCALES,
    Quantizers,
    fitted_quantizers,
    init_weight_scales,
    is_quantizer_parameter,
)
from sipa_core.resume import file_digest, run_key
from sipa_core.runtime import provenance
from sipa_core.scoring import count
from sipa_core.scoring.bits import BitWidths, parse_add
from sipa_core.stage_common import load_data, load_input_model
from sipa_core.stage_runner import Stage
from sipa_core.train import fit, predict
from sipa_core.train.evaluation import accuracy, normalized
from sipa_core.train.recipe import check_recipe, speed_settings

# Quantization-aware fine-tuning: a short low-lr cosine run from the trained weights, no mixing.
QAT_RECIPE = {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5, "no_bias_decay": True,
              "batch_size": 128, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.1,
              "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ghost_batch": 0, "augment": "none"}
ELEMENTWISE_BITS = 16  # the elementwise products are not quantized (see the module's doc)
WIDTH_COLUMNS = ["widths", "weight_bits", "act_bits", "val_accuracy", "accuracy", "exit_ratio", "threshold",
                 "params_bytes", "ops", "score", "score_tree", "chosen"]


def _layers(value) -> str | None:
    for pattern, widths in value.items():
        if not (isinstance(widths, list) and len(widths) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in widths)):
            return f"{pattern}: give [weight bits, activation bits], e.g. [8, 8]"
    return None


def _add_accounting(value) -> str | None:
    try:
        parse_add(value)
    except SipaError as err:
        return str(err)
    return None


def _schedule(value) -> str | None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in value):
        return f"give widths from 2 to 16, e.g. [8, 6], got {value}"
    for a, b in zip(value, value[1:]):
        if b >= a:
            return f"a width schedule falls step by step ({a} then {b} rises or stays)"
    return None


def _choices(value) -> str | None:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in value):
        return "must list widths, each an integer from 2 to 16"
    return "lists a width twice" if len(set(value)) != len(value) else None


def _labels(value) -> str | None:
    for label in value:
        if parse_label(label) is None:
            return f"{label!r} is not a width label such as W4A8"
    return None


def parse_label(label) -> tuple[int, int] | None:
    """``"W4A8"`` -> (4, 8); None when it is not such a label."""
    m = re.fullmatch(r"W(\d+)A(\d+)", str(label))
    return (int(m.group(1)), int(m.group(2))) if m else None


QUANTIZE_SCHEMA = {
    "weight_bits": Field(int, 8, min=2, max=16, help="default weight width (16: left in floating point)"),
    "act_bits": Field(int, 8, min=2, max=16, help="default width of conv/linear inputs (16: floating point)"),
    "add_bits": Field((int, str), 32, check=_add_accounting,
                      help="how `score` counts additions: a width (32: strict) or int / tree (facts sheet "
                           "section 9); the adder-tree accounting is always recorded too (score_tree)"),
    "layers": Field(dict, {}, check=_layers,
                    help="per-layer widths by module-name pattern, first match wins: {stem: [8, 8]}"),
    "epochs": Field(int, 2, min=0, help="QAT epochs of the main network"),
    "exit_epochs": Field(int, 1, min=0, help="QAT epochs of the exit on the frozen quantized network"),
    "recipe": Field(dict, {}, help="overrides of the QAT recipe (QAT_RECIPE)"),
    "calibration_batches": Field(int, 4, min=1, help="training batches that set the activation scales"),
    "act_quantizers": Field(str, "fitted", choices=ACT_QUANTIZERS,
                            help="fitted: each layer's input quantizer from its range (unsigned, shifted with a "
                                 "zero point, or signed); signed: every input signed"),
    "weight_scale": Field(str, "stats", choices=WEIGHT_SCALES,
                          help="stats: per-channel scale from max |w| at every step; learned: trained, "
                               "MSE-initialised (LSQ)"),
    "scale_lr": Field(float, None, nullable=True, min=0, min_exclusive=True,
                      help="learning rate of the quantizers' scales and zero points, without weight decay "
                           "(null: the recipe's lr and weight decay)"),
    "schedule": Field(list, [], check=_schedule,
                      help="widths trained before the final ones, falling, e.g. [8, 6] (each caps weights and "
                           "activations from below; steps not above the final widths are skipped)"),
    "schedule_epochs": Field(int, 1, min=1, help="QAT epochs of each schedule step"),
    "layer_widths": Field(str, "uniform", choices=("uniform", "allocated"),
                          help="allocated: each layer's width chosen from width_choices under budget or max_drop "
                               "(sensitivity on validation, exact per-layer cost, an integer program)"),
    "width_choices": Field(list, [8, 6, 4], check=_choices, help="allocated: the widths a layer may take"),
    "budget": Field(float, None, nullable=True, min=0, min_exclusive=True,
                    help="allocated: the main network's score (add_bits accounting) at most this; least drop"),
    "max_drop": Field(float, None, nullable=True, min=0, max=1,
                      help="allocated: summed single-layer validation drops at most this; lowest score"),
    "compare_widths": Field(list, ["W4A8", "W4A4"], check=_labels,
                            help="other widths trained for the plot, e.g. [W4A8, W4A4]"),
    "seed": Field(int, 0, min=0),
    **path_fields("quantize", model=("accelerate", "out"), data=("prepare", "out")),
}


def read_config(params_path: str | Path) -> dict:
    data = load_yaml(params_path)
    cfg = check_section(data.get("quantize"), QUANTIZE_SCHEMA, file=params_path, section="quantize")
    refuse_keys(cfg["recipe"], ("epochs", "seed"), file=params_path, section="quantize.recipe",
                why="set quantize.epochs / quantize.exit_epochs / quantize.seed instead")
    check_recipe({**QAT_RECIPE, **cfg["recipe"], "epochs": cfg["epochs"]}, file=params_path,
                 section="quantize.recipe")
    for pattern, (w, a) in cfg["layers"].items():
        for what, bits in (("weight", w), ("activation", a)):
            if not 2 <= bits <= 16:
                raise SipaError(f"{params_path}: quantize.layers.{pattern}: {what} bits must be 2..16, got {bits}")
    if cfg["schedule"]:
        check_recipe({**QAT_RECIPE, **cfg["recipe"], "epochs": cfg["schedule_epochs"], "stabilize_epochs": 0},
                     file=params_path, section="quantize.recipe (each schedule step)")
    _check_allocation(cfg, params_path)
    try:
        cfg["widths"] = widths_of(cfg, cfg["weight_bits"], cfg["act_bits"])
    except SipaError as err:
        raise SipaError(f"{params_path}: quantize: {err}") from None
    return cfg


def _check_allocation(cfg: dict, params_path) -> None:
    if cfg["layer_widths"] != "allocated":
        return
    if (cfg["budget"] is None) == (cfg["max_drop"] is None):
        raise SipaError(f"{params_path}: quantize.layer_widths: allocated needs exactly one of budget (a score) "
                        f"and max_drop (a validation accuracy drop)")
    if cfg["layers"]:
        raise SipaError(f"{params_path}: quantize.layers: per-layer widths are set by hand or allocated "
                        f"(layer_widths: allocated), not both")


def widths_of(cfg: dict, weight: int, act: int) -> BitWidths:
    overrides = tuple((p, int(w), int(a)) for p, (w, a) in cfg["layers"].items())
    return BitWidths(weight, act, cfg["add_bits"], overrides, ELEMENTWISE_BITS)


@dataclass
class QuantRun:
    """One quantize run: the float input network (main and exit), data, recipe, lineage."""

    cfg: dict
    data: object
    main: torch.nn.Module
    exit_record: dict | None
    recipe: dict
    lineage: dict
    key: dict
    params_file: str
    progress: bool | None = None
    rule: ExitRule | None = None  # the exit rule the accelerate stage recorded (with an exit)
    quantizers: Quantizers | None = None  # the main network's input quantizers (fitted once, from the float input)
    exit_quantizers: Quantizers | None = None

    def batches(self):
        """Calibration batches: training images, normalised, no augmentation."""
        x = self.data.split("train")[0]
        bs = self.recipe["batch_size"]
        return [normalized(x[i * bs:(i + 1) * bs], self.data.mean, self.data.std)
                for i in range(min(self.cfg["calibration_batches"], max(1, len(x) // bs)))]

    def logits(self, model, split: str, fp16: bool = True) -> torch.Tensor:
        """Logits of a split, the network run at 16 bits where it is not quantized (as counted)."""
        x, _ = self.data.split(split)
        return predict(model, x, self.data.mean, self.data.std, batch_size=self.recipe["eval_batch_size"], fp16=fp16)

    def labels(self, split: str) -> torch.Tensor:
        return self.data.split(split)[1]

    def own_lr(self):
        """The quantizers' scales and zero points at ``scale_lr`` without decay (None: as any parameter)."""
        return (is_quantizer_parameter, self.cfg["scale_lr"]) if self.cfg["scale_lr"] is not None else None

    def split_labels(self) -> dict:
        return {s: self.labels(s) for s in ("val", "test")}


def _start(cfg: dict, params_file: str, progress) -> QuantRun:
    where = f"{params_file}: quantize"
    data = load_data(cfg["data"], f"{where}.data")
    main, meta = load_input_model(Path(cfg["model"]), data, f"{where}.model", "accelerate")
    names = [n for n, _ in main.named_modules()]
    try:
        for widths in [cfg["widths"]] + [widths_of(cfg, *parse_label(label)) for label in cfg["compare_widths"]]:
            check_widths(widths, names)
    except SipaError as err:
        raise SipaError(f"{params_file}: {err}") from None
    lineage = input_lineage(meta, data, f"{where}.model", cfg["model"])
    if meta.get("exit") is not None:
        if len(data.val_y) == 0:
            raise SipaError(f"{where}: the exit threshold is chosen on the validation split, but prepare.val_size is 0")
        refuse_trained_split("val", lineage, f"{where} (the exit threshold is calibrated on val)", cfg["model"])
    recipe = check_recipe({**QAT_RECIPE, **speed_settings(meta.get("recipe")), **cfg["recipe"],
                           "epochs": cfg["epochs"], "seed": cfg["seed"]}, file=params_file, section="quantize.recipe")
    key = {"input": file_digest(cfg["model"]), "data": data.source, "recipe": recipe,
           **{k: cfg[k] for k in ("exit_epochs", "calibration_batches", "act_quantizers", "weight_scale",
                                  "scale_lr", "schedule")},
           **({"schedule_epochs": cfg["schedule_epochs"]} if cfg["schedule"] else {})}
    rule = ExitRule.from_record(meta["exit"], f"{where}.model: {cfg['model']}") if meta.get("exit") else None
    run = QuantRun(cfg, data, main, meta.get("exit"), recipe, lineage, key, params_file, progress, rule)
    _fit_quantizers(run)
    return run


def _fit_quantizers(run: QuantRun) -> None:
    """Each layer's input quantizer, from the float input network's ranges on the calibration batches."""
    act, scale = run.cfg["act_quantizers"], run.cfg["weight_scale"]
    run.quantizers = fitted_quantizers(run.main, run.batches(), act, scale)
    if run.exit_record is not None:
        float_net = from_record(run.main, run.exit_record, run.cfg["model"])
        run.exit_quantizers = fitted_quantizers(float_net, run.batches(), act, scale, part=float_net.exit)


def _quantized_copy(module: torch.nn.Module, widths: BitWidths, quantizers: Quantizers):
    """Fold BatchNorm into a copy of ``module``, quantize it; (copy, its masks: the zeros kept)."""
    q = copy.deepcopy(module).cpu().eval()
    fold_batchnorm(q)
    masks = masks_from_zeros(q)
    quantize_modules(q, widths, quantizers)
    return q, masks


def schedule_steps(cfg: dict, widths: BitWidths) -> list[BitWidths]:
    """The widths QAT steps through: each schedule width that is above the final widths (as a floor
    under every layer's weights and activations), then the final widths."""
    steps = []
    for bits in cfg["schedule"]:
        overrides = tuple((p, max(bits, w), max(bits, a)) for p, w, a in widths.overrides)
        step = replace(widths, weight=max(bits, widths.weight), act=max(bits, widths.act), overrides=overrides)
        if step != widths and (not steps or step != steps[-1]):
            steps.append(step)
    return steps + [widths]


def _float_weights(model: torch.nn.Module) -> dict:
    """A quantized network's float weights and biases (not its quantizers' scales)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".weight", ".bias"))}


def _train_main(run: QuantRun, widths: BitWidths, run_dir: Path) -> torch.nn.Module:
    """The quantized main network: for each step of the width schedule, the previous step's weights
    quantized at the step's widths, activation scales calibrated, then QAT with the masks kept."""
    steps, weights = schedule_steps(run.cfg, widths), None
    for i, step in enumerate(steps):
        main, masks = _quantized_copy(run.main, step, run.quantizers)
        if weights is not None:
            main.load_state_dict(weights, strict=False)
        calibrate(main, run.batches())
        init_weight_scales(main)
        last = i == len(steps) - 1
        step_recipe = {**run.recipe, "epochs": run.cfg["epochs"]} if last else \
            {**run.recipe, "epochs": run.cfg["schedule_epochs"], "stabilize_epochs": 0}
        label = f"W{step.weight}A{step.act}"
        if step_recipe["epochs"] > 0:
            fit(main, run.data, step_recipe, state_path=run_dir / ("main.pt" if last else f"main-{label}.pt"),
                tag=f"quantize-main-{label}", desc=f"QAT {label}", train_splits=tuple(run.lineage["splits"]),
                val_split="val" if len(run.data.val_y) else None, after_step=lambda m, k=masks: apply_masks(m, k),
                progress=run.progress, own_lr=run.own_lr(),
                teacher=copy.deepcopy(run.main) if run.recipe["distill_weight"] else None)
        weights = _float_weights(main)
    return main.cpu().eval()


def exit_widths_of(run: QuantRun, widths: BitWidths) -> BitWidths:
    """The exit's widths: the defaults without per-layer overrides, its own unsigned inputs."""
    return replace(widths.without_overrides(), unsigned=run.exit_quantizers.unsigned())


def _train_exit(run: QuantRun, main: torch.nn.Module, widths: BitWidths, run_dir: Path):
    """The quantized exit on the frozen quantized main network (its own loss, one-hot targets)."""
    float_net = from_record(run.main, run.exit_record, run.cfg["model"])  # wraps run.main, changes nothing
    qexit, masks = _quantized_copy(float_net.exit, exit_widths_of(run, widths), run.exit_quantizers)
    net = EarlyExitNetwork(main, float_net.exit_cfg, qexit)
    for p in main.parameters():
        p.requires_grad_(False)
    calibrate(net, run.batches(), part=net.exit)
    init_weight_scales(net.exit)
    if run.cfg["exit_epochs"] > 0:
        def train_mode(model):
            model.eval()
            model.exit.train()

        fit(net, run.data, {**run.recipe, "epochs": run.cfg["exit_epochs"], "label_smoothing": 0.0},
            state_path=run_dir / "exit.pt", tag=f"quantize-exit-{widths.label()}", desc=f"QAT exit {widths.label()}",
            params=list(net.exit.parameters()), loss_fn=LOSS_FUNCTIONS[run.exit_record.get("loss", "softsmoothing")],
            train_mode=train_mode, train_splits=tuple(run.lineage["splits"]), val_split="val",
            after_step=lambda m: apply_masks(m.exit, masks), progress=run.progress,
            own_lr=run.own_lr(),
            teacher=copy.deepcopy(float_net) if run.recipe["distill_weight"] else None)
    return net.cpu().eval()


def counted(run: QuantRun, main, net, widths: BitWidths):
    """The MicroNet cost of the quantized values: (main network's summary, ExitCost or None)."""
    h = run.data.image_size[0]
    plain = float_twin(main)
    if net is None:
        return count(plain, (3, h, h), bits=widths).summary(), None
    twin = EarlyExitNetwork(plain, net.exit_cfg, float_twin(net.exit))
    return count(plain, (3, h, h), bits=widths).summary(), exit_cost(twin, (3, h, h), bits=widths,
                                                                     exit_bits=exit_widths_of(run, widths))


def calibrate_threshold(run: QuantRun, logits: dict, cost: ExitCost) -> tuple[ThresholdPoint | None, float]:
    """The exit threshold chosen on validation by the rule the accelerate stage recorded in the exit
    (its thresholds and target, against this network's own validation accuracy); (choice, target)."""
    labels = {"val": run.labels("val")}
    target = run.rule.target(accuracy(logits["main"]["val"], labels["val"]))
    points = sweep({"val": logits["exit"]["val"]}, logits["main"], labels, run.rule.thresholds, cost)
    return choose(points, target), target


@dataclass
class QuantResult:
    """One width's quantized network and its figures (test unless named ``val_``); with an exit
    kept, the figures are the thresholded network's."""

    widths: BitWidths
    main: torch.nn.Module
    main_accuracy: float
    val_accuracy: float | None
    accuracy: float
    summary: dict  # the counted cost (at the test exit ratio with an exit)
    test_predictions: torch.Tensor
    net: EarlyExitNetwork | None = None
    val_target: float | None = None
    threshold: float | None = None
    exit_ratio: float = 0.0
    val_exit_ratio: float = 0.0


def quantize_network(run: QuantRun, widths: BitWidths) -> QuantResult:
    """Quantize, train and calibrate at ``widths``; the networks and their test figures."""
    widths = replace(widths, unsigned=run.quantizers.unsigned())  # counted as the quantizers run
    key = run_key({**run.key, "widths": widths.as_dict()})
    label = widths.label().replace(" ", "")
    if len(label) > 80:  # allocated: a width per layer; the key tells the runs apart
        label = f"W{widths.weight}A{widths.act}({len(widths.overrides)}layers)"
    run_dir = Path(run.cfg["state"]) / f"{label}-{key}"
    main = _train_main(run, widths, run_dir)
    net = _train_exit(run, main, widths, run_dir) if run.exit_record is not None else None
    logits = {"main": {s: run.logits(main, s) for s in ("val", "test")}}
    main_summary, cost = counted(run, main, net, widths)
    main_accuracy = accuracy(logits["main"]["test"], run.labels("test"))
    result = QuantResult(widths, main, main_accuracy,
                         accuracy(logits["main"]["val"], run.labels("val")) if len(run.data.val_y) else None,
                         main_accuracy, main_summary, logits["main"]["test"].argmax(1))
    if net is None:
        return result
    logits["exit"] = {s: run.logits(net, s) for s in ("val", "test")}
    chosen, result.val_target = calibrate_threshold(run, logits, cost)
    if chosen is None:
        return result
    tpred, texit = simulate(logits["exit"]["test"], logits["main"]["test"], chosen.threshold)
    ratio = float(texit.float().mean())
    result.net, result.threshold, result.exit_ratio = net, chosen.threshold, ratio
    result.val_exit_ratio, result.val_accuracy = chosen.val_exit_ratio, chosen.val_accuracy
    result.accuracy, result.summary = accuracy(tpred, run.labels("test")), cost.summary(ratio)
    result.test_predictions = tpred
    return result


ALLOCATION_COLUMNS = ["layer", "bits", "val_drop", "score"]


def allocate_widths(run: QuantRun) -> Allocation:
    """Each layer's width under ``budget`` or ``max_drop`` (allocate.py): drops on validation, kept
    in the state folder so a resumed run does not measure them again."""
    cfg, data = run.cfg, run.data
    x, y = data.split("val")
    if not len(y):
        raise SipaError(f"{run.params_file}: quantize.layer_widths: allocated measures each layer on the "
                        f"validation split, but it is empty (prepare.val_size: 0)")
    bs = run.recipe["eval_batch_size"]
    validation = [(normalized(x[i:i + bs], data.mean, data.std), y[i:i + bs]) for i in range(0, len(y), bs)]
    widths = replace(cfg["widths"], unsigned=run.quantizers.unsigned())
    costs, fixed = layer_costs(run.main, (3, *data.image_size), cfg["width_choices"], widths)
    if cfg["budget"] is not None:  # infeasible whatever the drops: say so before measuring them
        try:
            allocate({k: 0.0 for k in costs}, costs, fixed, budget=cfg["budget"])
        except SipaError as err:
            raise SipaError(f"{run.params_file}: {err}") from None
    saved = Path(cfg["state"]) / f"drops-{run_key({**run.key, 'choices': cfg['width_choices']})}.json"
    if saved.is_file():
        drops = {(n, int(b)): d for n, b, d in json.loads(saved.read_text())}
    else:
        drops = layer_drops(run.main, cfg["width_choices"], widths, run.quantizers, run.batches(), validation)
        atomic_write_json(saved, [[n, b, d] for (n, b), d in drops.items()])
    try:
        return allocate(drops, costs, fixed, budget=cfg["budget"], max_drop=cfg["max_drop"])
    except SipaError as err:
        raise SipaError(f"{run.params_file}: {err}") from None


def allocation_metrics(allocation: Allocation | None) -> dict:
    if allocation is None:
        return {}
    return {"allocated_widths": allocation.widths, "allocation_predicted_drop": allocation.predicted_drop,
            "allocation_predicted_score": allocation.predicted_score}


def input_accuracy(run: QuantRun) -> float:
    """The floating-point input network's test accuracy at its own threshold, run at 16 bits (as the
    accelerate stage scores it under the 16-bit freebie)."""
    main_logits = run.logits(run.main, "test")
    if run.exit_record is None:
        return accuracy(main_logits, run.labels("test"))
    net = from_record(run.main, run.exit_record, run.cfg["model"])
    pred, _ = simulate(run.logits(net, "test"), main_logits, run.exit_record["threshold"])
    return accuracy(pred, run.labels("test"))


def width_row(result: QuantResult, chosen: bool) -> dict:
    s, w = result.summary, result.widths
    return {"widths": f"W{w.weight}A{w.act}", "weight_bits": w.weight, "act_bits": w.act,
            "val_accuracy": result.val_accuracy, "accuracy": result.accuracy,
            "exit_ratio": result.exit_ratio, "threshold": result.threshold, "params_bytes": s["params_bytes"],
            "ops": s["ops"], "score": s["score"], "score_tree": s["score_tree"], "chosen": "yes" if chosen else "no"}


def onnx_check(run: QuantRun, result: QuantResult) -> tuple[dict, dict]:
    """Export the chosen network to ONNX and run the test split with onnxruntime (adaptively
    at the chosen threshold): (files' bytes by name, metrics, with the kernels onnxruntime runs
    the main network's layers with after its graph optimisations)."""
    folder = Path(run.cfg["state"]) / "onnx"
    h = run.data.image_size[0]
    files = export_network(result.main, result.net, (3, h, h), folder)
    onnx = OnnxNetwork.load(files, result.threshold)
    x, y = run.data.split("test")
    preds = onnx_predictions(onnx, x, run.data.mean, run.data.std)
    ops = integer_kernel_counts(files["full"])
    metrics = {"onnx_accuracy": accuracy(preds, y),
               "onnx_agreement": float((preds == result.test_predictions).float().mean()),
               "onnx_integer_layers": sum(ops.get(k, 0) for k in INTEGER_KERNELS),
               "onnx_float_layers": sum(ops.get(k, 0) for k in FLOAT_KERNELS),
               "quantized_layers": quantized_layer_count(result.main)}
    return {f"{name}.onnx": path.read_bytes() for name, path in files.items()}, metrics


def _write_onnx(folder: Path, files: dict) -> None:
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)


def _drop_stale_onnx(folder: Path, files: dict) -> None:
    for old in folder.glob("*.onnx"):
        if old.name not in files:
            old.unlink()


def _save(run: QuantRun, result: QuantResult) -> None:
    widths, net = result.widths, result.net
    quant = {"widths": widths.as_dict(), "label": widths.label(), "batchnorm_folded": True,
             "quantizers": run.quantizers.as_record()}
    exit_record = None
    if net is not None:
        quant.update(exit_widths=exit_widths_of(run, widths).as_dict(), exit_quantizers=run.exit_quantizers.as_record())
        exit_record = {**net.exit_cfg, "state": net.exit.state_dict(), "threshold": result.threshold,
                       "exit_ratio": result.exit_ratio, "loss": run.exit_record.get("loss", "softsmoothing"),
                       "rule": run.exit_record["rule"]}
    save_model(run.cfg["out"], result.main, recipe=run.recipe, stage="quantize", lineage=run.lineage,
               quant=quant, **({"exit": exit_record} if exit_record is not None else {}))


def _metrics(run: QuantRun, chosen: QuantResult, baseline: float) -> dict:
    """The stage's metrics: the chosen width's network against its floating-point input."""
    return {**chosen.summary, "accuracy": chosen.accuracy, "val_accuracy": chosen.val_accuracy,
            "main_accuracy": chosen.main_accuracy, "input_accuracy": baseline,
            "main_accuracy_fp32": accuracy(run.logits(chosen.main, "test", fp16=False), run.labels("test")),
            "accuracy_change": chosen.accuracy - baseline, "threshold": chosen.threshold,
            "exit_ratio": chosen.exit_ratio, "val_exit_ratio": chosen.val_exit_ratio,
            "val_target": chosen.val_target, "exit_kept": chosen.net is not None,
            "elementwise_bits": ELEMENTWISE_BITS, "widths": chosen.widths.label(),
            "input_sparsity": sparsity(run.main), "sparsity": sparsity(chosen.main)}


def quantize(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    run = _start(cfg, params_file, progress)
    baseline = input_accuracy(run)
    allocation = allocate_widths(run) if cfg["layer_widths"] == "allocated" else None
    main_widths = cfg["widths"] if allocation is None else \
        replace(cfg["widths"], overrides=tuple((n, b, b) for n, b in allocation.widths.items()))
    results = [quantize_network(run, main_widths)]
    results += [quantize_network(run, widths_of(cfg, *parse_label(label))) for label in cfg["compare_widths"]]
    chosen = results[0]
    metrics = {**_metrics(run, chosen, baseline), **allocation_metrics(allocation)}
    rows = [width_row(r, r is chosen) for r in results]
    onnx_files, onnx_metrics = onnx_check(run, chosen)
    metrics.update(onnx_metrics)
    with publishing(cfg["metrics"]):
        _save(run, chosen)
        atomic_write_csv(cfg["table"], rows, WIDTH_COLUMNS)
        atomic_write_csv(cfg["allocation"], allocation.rows() if allocation else [], ALLOCATION_COLUMNS)
        _write_onnx(Path(cfg["onnx"]), onnx_files)
    _drop_stale_onnx(Path(cfg["onnx"]), onnx_files)
    metrics.update(provenance(seed=cfg["seed"], device=run.recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


def summary(cfg: dict, m: dict) -> str:
    exit_text = (f"exit at threshold {m['threshold']:.2f}, {m['exit_ratio']:.1%} of test images leave"
                 if m["exit_kept"] else "no exit")
    return (f"quantize: {m['widths']}: accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f} against the "
            f"float input), {exit_text}; sparsity {m['input_sparsity']:.1%} -> {m['sparsity']:.1%}; "
            f"score {m['score']:.6f}")


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that these settings do not use."""
    out = [f"quantize.{k}: layer_widths is uniform" for k in ("width_choices", "budget", "max_drop")
           if k in raw and cfg["layer_widths"] == "uniform"]
    return out + _inactive_schedule(cfg, raw)


def _inactive_schedule(cfg: dict, raw: dict) -> list[str]:
    if not cfg["schedule"]:
        return ["quantize.schedule_epochs: schedule is empty (QAT trains at the final widths only)"] \
            if "schedule_epochs" in raw else []
    if len(schedule_steps(cfg, cfg["widths"])) == 1:
        return [f"quantize.schedule: no width of {cfg['schedule']} is above {cfg['widths'].label()}, "
                "the main widths train without steps"]
    return []


STAGE = Stage("quantize", __doc__, read_config, quantize, summary, inactive)
