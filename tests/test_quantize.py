"""The quantizing stage: BatchNorm folding, Brevitas layers at per-layer widths, masks
kept through QAT, the exit re-calibrated on validation, quantized checkpoints loaded
and counted at their own widths, and bad input."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from helpers import save_prepared, tiny_data, tiny_model
from sipa_core.accelerate import accelerate, read_config as accelerate_config
from sipa_core.accelerate.record import ExitRecord
from sipa_core.checkpoint import load_model, read_checkpoint, save_model
from sipa_core.errors import SipaError
from sipa_core.lineage import Lineage
from sipa_core.prune.masks import apply_masks, full_masks, magnitude_masks, prunable
from sipa_core.data.prepared import load_prepared
from sipa_core.quantize.onnx_integer import integer_kernel_counts, session_and_warnings
from sipa_core.quantize.allocate import allocate, layer_costs
from sipa_core.quantize.qat import calibrate, float_twin, fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import Quantizers, input_kind, is_quantizer_parameter
from sipa_core.quantize.record import QuantRecord, load_quantized
from sipa_core.quantize.stage import quantize, read_config
from sipa_core.scoring import BitWidths, count
from sipa_core.train import default_recipe, evaluate, fit, sixteen_bit
from sipa_core.train.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(n_train=96, n_val=48, n_test=48)


def _trained_pruned_tiny():
    model = tiny_model()
    data = tiny_data(**DATA)
    fit(model, data, default_recipe(epochs=3, batch_size=16, lr=0.1), val_split=None, progress=False)
    masks = magnitude_masks(model, full_masks(model), 0.5, scope="global", normalize="l2")
    apply_masks(model, masks)
    return model.cpu().eval(), masks


@pytest.fixture(scope="module")
def accelerated(tmp_path_factory):
    """A trained tiny network, half its weights pruned, with an exit after block 0: what the
    accelerate stage hands to the quantize stage."""
    root = tmp_path_factory.mktemp("acc")
    model, masks = _trained_pruned_tiny()
    save_model(root / "prune.pt", model, masks=masks, recipe=default_recipe(batch_size=16, lr=0.1),
               lineage=Lineage({"source": "generated", "seed": 0}, ("train",)))
    save_prepared(tiny_data(**DATA), root / "data.pt")
    acc = {"model": str(root / "prune.pt"), "data": str(root / "data.pt"), "positions": [0], "epochs": 2,
           "recipe": {"lr": 0.05}, "max_drop": 0.3, "thresholds": [0.3, 0.5, 0.7, 0.9], "allow_no_exit": False,
           "compare_loss": False, "table_thresholds": [0.5], "out": str(root / "acc.pt"),
           "state": str(root / "state_acc"), "metrics": str(root / "m_acc.json"), "info": str(root / "i_acc.json"),
           "table": str(root / "exits.csv"), "risk_coverage": str(root / "rc.csv")}
    (root / "acc.yaml").write_text(yaml.safe_dump({"accelerate": acc}))
    accelerate(accelerate_config(root / "acc.yaml"), params_file=str(root / "acc.yaml"), progress=False)
    return root, acc


def _params(tmp_path, root, acc, **quant):
    cfg = {"model": str(root / "acc.pt"), "data": str(root / "data.pt"), "epochs": 2, "exit_epochs": 1,
           "recipe": {"batch_size": 16}, "calibration_batches": 2, "compare_widths": ["W4A4"],
           "out": str(tmp_path / "models/q.pt"), "onnx": str(tmp_path / "models/q_onnx"),
           "state": str(tmp_path / "state"),
           "metrics": str(tmp_path / "metrics/q.json"), "info": str(tmp_path / "info/q.json"),
           "table": str(tmp_path / "plots/q.csv"), "allocation": str(tmp_path / "plots/alloc.csv"), **quant}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"quantize": cfg}))  # the exit rule comes from the checkpoint, not params
    return path


def test_folding_batchnorm_keeps_the_function_and_the_names():
    model, _ = _trained_pruned_tiny()
    x = torch.randn(8, 3, 16, 16)
    ref = model(x)
    names = {n for n, _ in model.named_parameters() if n.endswith(".weight") and "." in n}
    assert fold_batchnorm(model) == 7  # stem, head; block 0: dw, project; block 1: expand, dw, project
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    conv_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[0] in conv_names} == conv_names


def test_quantized_layers_take_their_widths_and_keep_zeros():
    model, masks = _trained_pruned_tiny()
    fold_batchnorm(model)
    widths = BitWidths(4, 4, 32, (("stem", 8, 8), ("classifier", 8, 8)))
    quantize_modules(model, widths)
    calibrate(model, [torch.randn(16, 3, 16, 16)])
    q_stem = model.stem[0].quant_weight()
    q_block = model.blocks[1].project[0].quant_weight()
    assert q_stem.bit_width.item() == 8 and q_block.bit_width.item() == 4
    # 4-bit symmetric per output channel: at most 15 distinct values per channel, zeros stay zero
    per_channel = (q_block.value / q_block.scale).round()
    assert per_channel.abs().max().item() <= 8
    for name, keep in masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.all(module.quant_weight().value[~keep] == 0), name
    # Run at 16 bits, a quantized layer keeps its integer weights and its scales; its bias is FP16.
    h = sixteen_bit(model.eval())
    layer, h_layer = model.blocks[1].project[0], h.blocks[1].project[0]
    assert torch.equal(h_layer.quant_weight().value, layer.quant_weight().value)
    assert torch.equal(h_layer.bias, layer.bias.half().float()) and not torch.equal(h_layer.bias, layer.bias)
    twin = float_twin(model)
    x = torch.randn(4, 3, 16, 16)
    assert not any(type(m).__module__.startswith("brevitas") for m in twin.modules())
    assert twin(x).shape == model.eval()(x).shape


@pytest.mark.slow  # QAT runs and CLI subprocesses
def test_stage_quantizes_keeps_sparsity_recalibrates_and_loads(tmp_path, accelerated):
    root, acc = accelerated
    params = _params(tmp_path, root, acc)
    m = quantize(read_config(params), params_file=str(params), progress=False)
    assert m["weight_bits"] == 8 and m["act_bits"] == 8 and m["elementwise_bits"] == 16
    assert m["sparsity"] >= m["input_sparsity"] > 0.3  # masks kept; rounding may add zeros
    assert m["exit_kept"] and m["threshold"] in acc["thresholds"]
    assert m["val_accuracy"] >= m["val_target"] - 1e-9  # the threshold met the target on validation
    # Integer inference: the exported graphs under onnxruntime, adaptive at the chosen threshold.
    assert sorted(p.name for p in (tmp_path / "models/q_onnx").iterdir()) == ["full.onnx", "path.onnx", "rest.onnx"]
    # Agreement with the stage's predictions, which run the elementwise operations at 16 bits (the
    # counted network): an fp16 rounding can move a value across an output quantizer's step, so two
    # of these 48 near-tie images may differ (one of them changing the accuracy); on fp32 the graph
    # computes what PyTorch computes (tests/test_latency.py).
    assert abs(m["onnx_accuracy"] - m["accuracy"]) <= 1 / 48 + 1e-6 and m["onnx_agreement"] >= 0.95
    # onnxruntime, all graph optimisations on, runs every quantized conv and linear layer as one
    # integer kernel (the outputs are quantized: QLinearConv / QGemm), none in float, so every
    # multiply-add runs in integer; loading warns of nothing.
    convs = sum(isinstance(x, torch.nn.Conv2d) for x in tiny_model().modules())
    assert m["quantized_layers"] == convs + 1 and m["onnx_integer_layers"] == convs + 1
    assert m["onnx_float_layers"] == 0 and m["onnx_integer_mac_share"] == 1.0
    ops = integer_kernel_counts(tmp_path / "models/q_onnx/full.onnx")
    assert ops["QLinearConv"] == convs and ops["QGemm"] == 1, ops
    assert session_and_warnings(tmp_path / "models/q_onnx/full.onnx")[1] == []
    assert not [i for i in onnx.load(str(tmp_path / "models/q_onnx/full.onnx")).graph.input if i.name != "image"]
    rows = (tmp_path / "plots/q.csv").read_text().splitlines()
    assert rows[0].startswith("widths,weight_bits,act_bits") and [r.split(",")[0] for r in rows[1:]] == ["W8A8", "W4A4"]
    w4 = dict(zip(rows[0].split(","), rows[2].split(",")))
    assert float(w4["score"]) < m["score"]  # narrower widths count less
    # The checkpoint loads (weights_only) as the quantized structure and reproduces the figures.
    loaded = load_quantized(tmp_path / "models/q.pt")
    main = loaded.main
    assert loaded.record.widths.weight == 8 and loaded.exit.threshold == m["threshold"]
    # The threshold was chosen by the rule the accelerate stage recorded, and the rule travels on.
    assert loaded.exit.rule == ExitRecord.of(read_checkpoint(root / "acc.pt")).rule
    assert loaded.exit.rule.as_record() == {"thresholds": acc["thresholds"], "min_accuracy": None,
                                            "max_drop": acc["max_drop"], "allow_no_exit": False}
    with pytest.raises(SipaError, match="a quantized checkpoint"):  # never built as a float network
        load_model(tmp_path / "models/q.pt")
    out = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--checkpoint",
                          str(tmp_path / "models/q.pt"), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["score"] == pytest.approx(m["score"], rel=1e-6)
    bad = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--checkpoint",
                          str(tmp_path / "models/q.pt"), "--weight-bits", "4"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "counted at its own widths" in bad.stderr
    source, _ = load_model(root / "acc.pt")
    trained = dict(main.named_parameters())
    for name, p in prunable(source).items():
        assert torch.all(trained[name][p == 0] == 0), name  # every pruned weight still zero


@pytest.mark.parametrize("change, message", [
    ({"weight_bits": 1}, "quantize.weight_bits"),
    ({"layers": {"nothing_here": [8, 8]}}, "'nothing_here' names no layer"),
    ({"layers": {"stem": [8]}}, "quantize.layers"),
    ({"compare_widths": ["W4"]}, "quantize.compare_widths"),
    ({"add_bits": "fp8"}, "quantize.add_bits: addition accounting must be a width from 1 to 32, int or tree"),
    ({"recipe": {"epochs": 3}}, "quantize.recipe"),
    ({"schedule": [6, 8]}, "quantize.schedule: a width schedule falls step by step (6 then 8 rises or stays)"),
    ({"schedule": [8, 1]}, "quantize.schedule: give widths from 2 to 16"),
    ({"act_quantizers": "asymmetric"}, "quantize.act_quantizers: 'asymmetric' is not one of fitted, signed"),
    ({"weight_scale": "lsq"}, "quantize.weight_scale"),
    ({"scale_lr": 0}, "quantize.scale_lr: must be > 0"),
    ({"recipe": {"distill_weight": 1.5}}, "quantize.recipe.distill_weight: must be <= 1"),
    ({"layer_widths": "allocated"}, "quantize.layer_widths: allocated needs exactly one of budget"),
    ({"layer_widths": "allocated", "budget": 0.01, "max_drop": 0.01}, "needs exactly one of budget"),
    ({"layer_widths": "allocated", "budget": 0.01, "layers": {"stem": [8, 8]}},
     "quantize.layers: per-layer widths are set by hand or allocated"),
    ({"layer_widths": "allocated", "budget": 0.01, "width_choices": [8, 1]}, "quantize.width_choices"),
])
def test_bad_params_exit_2_naming_the_key(tmp_path, accelerated, change, message, run_script):
    root, acc = accelerated
    params = _params(tmp_path, root, acc, **change)
    code, _, err = run_script(ROOT / "stages/quantize.py", "--params", params, cwd=tmp_path)
    assert code == 2, err
    assert message in err and str(params) in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "models").exists()


def test_a_budget_below_every_allocation_is_refused_before_measuring(tmp_path, accelerated, run_script):
    root, acc = accelerated
    params = _params(tmp_path, root, acc, layer_widths="allocated", budget=1e-9)
    code, _, err = run_script(ROOT / "stages/quantize.py", "--params", params, cwd=tmp_path)
    assert code == 2 and f"{params}: quantize.budget: 1e-09 is below the cheapest allocation" in err, err
    assert not list((tmp_path / "state").glob("drops-*.json")) and not (tmp_path / "models").exists()


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path, accelerated, run_script):
    root, acc = accelerated
    params = _params(tmp_path, root, acc, epochs=0, exit_epochs=0, compare_widths=[])
    quantize(read_config(params), params_file=str(params), progress=False)
    (tmp_path / "again").mkdir()
    again = _params(tmp_path / "again", root, acc, model=str(tmp_path / "models/q.pt"))
    code, _, err = run_script(ROOT / "stages/quantize.py", "--params", again, cwd=tmp_path)
    assert code == 2 and "is already quantized (W8A8" in err, err


# A width schedule with learned weight scales, killed in the final step's first epoch: the
# finished W8A8 step is restored, the final step resumes after its first epoch.
KILLED_RUN = {"weight_bits": 4, "act_bits": 4, "schedule": [8], "schedule_epochs": 2, "weight_scale": "learned",
              "scale_lr": 0.002}


@pytest.mark.slow  # stage subprocesses, one killed
def test_a_killed_quantize_run_resumes_to_the_same_network(tmp_path, accelerated):
    """Killed after a QAT epoch and run again: it resumes there (not from scratch) and ends with
    the uninterrupted run's network, bit for bit. (It once did not: loading the saved state made
    Brevitas replace its activation scale and zero-point parameters, so the optimizer, built
    before, trained stale copies and the resumed run's scales stopped learning.) A second
    uninterrupted run in a fresh process gives the same metrics: the stage is deterministic."""
    root, acc = accelerated
    quant, kill, resumed = KILLED_RUN, "epoch:3", "resuming after epoch 1/2"
    outs, metrics = {}, {}
    for name, fault in (("whole", None), ("killed", kill), ("again", None)):
        (tmp_path / name).mkdir()
        params = _params(tmp_path / name, root, acc, compare_widths=[], **quant)
        cmd = [sys.executable, str(ROOT / "stages/quantize.py"), "--params", str(params)]
        if fault:
            killed = subprocess.run(cmd, cwd=tmp_path / name, capture_output=True, text=True,
                                    env={**os.environ, "SIPA_FAULT": fault})
            assert killed.returncode == -9 and not (tmp_path / name / "models/q.pt").exists()
        done = subprocess.run(cmd, cwd=tmp_path / name, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not fault or resumed in done.stderr, done.stderr
        outs[name] = torch.load(tmp_path / name / "models/q.pt", weights_only=True)["model"]
        metrics[name] = json.loads((tmp_path / name / "metrics/q.json").read_text())
        metrics[name].pop("wall_time_s")
    for name in ("killed", "again"):
        assert outs[name].keys() == outs["whole"].keys()
        assert all(torch.equal(v, outs[name][k]) for k, v in outs["whole"].items()), name
        assert metrics[name] == metrics["whole"], name


@pytest.mark.slow  # QAT runs
def test_fitted_quantizers_learned_scales_and_a_width_schedule(tmp_path, accelerated):
    """Swish outputs get a shifted quantizer, learned weight scales are trained at their own rate,
    the schedule trains W8A8 then W6A6 before W4A4, and the checkpoint rebuilds the same network."""
    root, acc = accelerated
    params = _params(tmp_path, root, acc, weight_bits=4, act_bits=4, compare_widths=[], act_quantizers="fitted",
                     weight_scale="learned", scale_lr=0.002, schedule=[8, 6, 4], schedule_epochs=1)
    m = quantize(read_config(params), params_file=str(params), progress=False)
    states = sorted(p.name for p in next((tmp_path / "state").glob("W4A4*")).iterdir())
    assert states == ["exit.pt", "main-W6A6.pt", "main-W8A8.pt", "main.pt"]  # 4 is the final width: no step
    loaded = load_quantized(tmp_path / "models/q.pt")
    main, record = loaded.main, loaded.record
    inputs = record.quantizers.inputs
    # The stem sees the normalised image (signed); a depthwise conv and the projection see swish outputs.
    assert "stem.0" not in inputs and inputs["blocks.1.depthwise.0"] == "shifted"
    assert inputs["blocks.1.project.0"] == "shifted" and record.quantizers.weight_scale == "learned"
    assert list(record.widths.unsigned) == sorted(inputs)
    layer = main.get_submodule("blocks.1.depthwise.0")
    assert not layer.input_quant.is_signed and layer.input_quant.zero_point().item() > 0
    assert "weight_quant.tensor_quant.scaling_impl.value" in dict(layer.named_parameters())
    # The rebuilt checkpoint reproduces the stage's main-network test accuracy (16-bit evaluation).
    data = load_prepared(root / "data.pt")
    assert evaluate(main, data, "test", fp16=True) == pytest.approx(m["main_accuracy"], abs=1e-9)
    # The adder tree counts the unsigned inputs' operands one bit wider than signed ones would be.
    signed = count(float_twin(main), (3, 16, 16), bits=replace(record.widths, unsigned=())).summary()["ops_tree"]
    assert m["ops_tree"] > 0 and count(float_twin(main), (3, 16, 16), bits=record.widths).summary()["ops_tree"] > signed


def test_quantizer_parameters_get_their_own_rate_without_decay():
    model, _ = _trained_pruned_tiny()
    fold_batchnorm(model)
    quantize_modules(model, BitWidths(4, 4), Quantizers({"blocks.1.project.0": "shifted"}, "learned"))
    groups = {g["name"]: g for g in param_groups(model, model.parameters(), 1e-4, True, False,
                                                 (is_quantizer_parameter, 0.003))}
    own = {id(p) for p in groups["own_lr"]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in own}
    assert groups["own_lr"]["lr"] == 0.003 and groups["own_lr"]["weight_decay"] == 0.0
    assert "blocks.1.project.0.input_quant.fused_activation_quant_proxy.tensor_quant.zero_point_impl.value" in names
    assert "stem.0.weight_quant.tensor_quant.scaling_impl.value" in names
    assert not any(n.endswith((".weight", ".bias")) for n in names)
    assert len(own) == sum(1 for n, _ in model.named_parameters() if is_quantizer_parameter(n))


@pytest.mark.parametrize("low, high, kind", [(0.0, 3.0, "unsigned"), (-0.28, 6.0, "shifted"),
                                             (-2.0, 2.5, "signed"), (-0.28, 0.4, "signed"), (-5.0, 0.0, "signed")])
def test_each_input_range_gets_the_quantizer_that_fits_it(low, high, kind):
    assert input_kind(low, high) == kind


def test_the_allocation_is_the_exact_integer_program_by_hand():
    """Two layers, widths 8 or 4: costs and drops chosen so that greedy and exact differ."""
    costs = {("a", 8): 4.0, ("a", 4): 2.0, ("b", 8): 6.0, ("b", 4): 3.0}
    drops = {("a", 8): 0.0, ("a", 4): 0.01, ("b", 8): 0.0, ("b", 4): 0.05}
    # budget 8 (fixed 1): a4 + b8 = 8 + 1 > 8... the options: a8b4 = 7 + 1 (drop .05), a4b4 = 5 + 1 (.06),
    # a4b8 = 8 + 1 > 8: the least drop within budget is a8 b4
    best = allocate(drops, costs, 1.0, budget=8.0)
    assert best.widths == {"a": 8, "b": 4} and best.predicted_score == 8.0 and best.predicted_drop == 0.05
    # the lowest score with summed drop at most 0.02: a4 b8 (score 9), not a8 b4 (drop .05)
    cheap = allocate(drops, costs, 1.0, max_drop=0.02)
    assert cheap.widths == {"a": 4, "b": 8} and cheap.predicted_score == 9.0
    with pytest.raises(SipaError, match="quantize.budget: 5.0 is below the cheapest allocation"):
        allocate(drops, costs, 1.0, budget=5.0)


def test_layer_costs_add_up_to_the_counted_score(accelerated):
    """Each layer's score at a width, plus the constant rest, is the whole network's counted score."""
    root, _ = accelerated
    model, _ = load_model(root / "prune.pt")
    widths = BitWidths(8, 8, 32, (), 16)
    costs, fixed = layer_costs(model, (3, 16, 16), [8, 4], widths)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    layers = {n for n, _ in costs}
    for bits in (8, 4):
        whole = count(folded, (3, 16, 16), bits=BitWidths(bits, bits, 32, (), 16)).summary()["score"]
        assert fixed + sum(costs[(n, bits)] for n in layers) == pytest.approx(whole, rel=1e-9)
    mixed = BitWidths(8, 8, 32, (("stem", 4, 4),), 16)
    whole = count(folded, (3, 16, 16), bits=mixed).summary()["score"]
    assert fixed + sum(costs[(n, 4 if n.startswith("stem") else 8)] for n in layers) == pytest.approx(whole)


@pytest.mark.slow  # sensitivity of every layer, then QAT
def test_stage_allocates_widths_under_a_budget(tmp_path, accelerated):
    root, acc = accelerated
    model, _ = load_model(root / "acc.pt")
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    at = {b: count(folded, (3, 16, 16), bits=BitWidths(b, b, 32, (), 16)).summary()["score"] for b in (8, 4)}
    budget = (at[8] + at[4]) / 2
    params = _params(tmp_path, root, acc, layer_widths="allocated", width_choices=[8, 4], compare_widths=[],
                     exit_epochs=0, epochs=1, budget=budget)
    m = quantize(read_config(params), params_file=str(params), progress=False)
    chosen = m["allocated_widths"]
    assert set(chosen.values()) == {4, 8} and m["allocation_predicted_score"] <= budget
    rows = (tmp_path / "plots/alloc.csv").read_text().splitlines()
    assert rows[0] == "layer,bits,val_drop,score" and len(rows) == 1 + len(chosen)
    record = QuantRecord.of(read_checkpoint(tmp_path / "models/q.pt"))
    overrides = {p: (w, a) for p, w, a in record.widths.overrides}
    assert overrides == {n: (b, b) for n, b in chosen.items()}  # the checkpoint trained at them
    assert list((tmp_path / "state").glob("drops-*.json"))  # a resumed run does not measure again


@pytest.mark.parametrize("allow_no_exit", [True, False])
def test_the_quantizing_stage_decides_on_the_exit_by_the_accelerate_stages_rule(tmp_path, accelerated,
                                                                                 allow_no_exit):
    """The recorded rule is applied whole: at threshold 0.99 no image leaves, so the exit only adds
    cost; with allow_no_exit the quantizing stage drops it (as the accelerate stage would), without
    it the exit is kept because it meets the target."""
    root, acc = accelerated
    ckpt = torch.load(root / "acc.pt", weights_only=True)
    ckpt["exit"]["rule"] = {"thresholds": [0.99], "min_accuracy": None, "max_drop": 1.0,
                            "allow_no_exit": allow_no_exit}
    torch.save(ckpt, tmp_path / "acc.pt")
    params = _params(tmp_path, root, acc, model=str(tmp_path / "acc.pt"), epochs=0, exit_epochs=0,
                     compare_widths=[])
    m = quantize(read_config(params), params_file=str(params), progress=False)
    info = json.loads((tmp_path / "info/q.json").read_text())
    assert m["exit_kept"] is not allow_no_exit
    if allow_no_exit:
        assert "does not lower the score" in info["exit_dropped_reason"] and m["threshold"] is None
        assert ExitRecord.of(read_checkpoint(tmp_path / "models/q.pt")) is None
        assert sorted(p.name for p in (tmp_path / "models/q_onnx").iterdir()) == ["full.onnx"]
    else:
        assert m["threshold"] == 0.99 and "exit_dropped_reason" not in info
