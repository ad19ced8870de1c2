"""Distillation as an engine feature: the loss, the teacher frozen in eval mode, its cost
counted, off reproducing the plain run exactly, and the stages that have a teacher (prune,
quantize) against those that refuse a distillation weight."""

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import save_prepared, tiny_data, tiny_model
from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.lineage import lineage_record
from sipa_core.prune.stage import prune, read_config
from sipa_core.runtime import training_cost
from sipa_core.train import default_recipe, fit, normalized
from sipa_core.train.engine import distillation_loss


def test_the_loss_is_t_squared_kl_of_the_softened_logits():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    t = 4.0
    p, q = F.softmax(teacher / t, 1), F.softmax(student / t, 1)
    by_hand = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert distillation_loss(student, teacher, t).item() == pytest.approx(by_hand.item(), rel=1e-5)  # float32
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def _trained(data, epochs=3):
    model = tiny_model()
    fit(model, data, default_recipe(epochs=epochs, batch_size=16, lr=0.1), val_split=None, progress=False)
    return model


def test_off_is_the_plain_run_and_on_moves_the_student_toward_the_frozen_teacher():
    data = tiny_data(n_train=64)
    teacher = _trained(data)
    before = copy.deepcopy(teacher.state_dict())
    recipe = default_recipe(epochs=2, batch_size=16, lr=0.05, seed=3)
    plain, off = tiny_model(seed=1), tiny_model(seed=1)
    fit(plain, data, recipe, val_split=None, progress=False)
    fit(off, data, recipe, val_split=None, progress=False, teacher=teacher)  # weight 0: the teacher is unused
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))

    started = 0.0
    on = tiny_model(seed=1)
    fit(on, data, {**recipe, "distill_weight": 1.0, "distill_temperature": 2.0}, val_split=None, progress=False,
        teacher=teacher)
    x = normalized(data.train_x, data.mean, data.std)
    with torch.no_grad():
        t_logits = teacher.eval()(x)
        gap = {name: distillation_loss(m.eval()(x), t_logits, 2.0).item() for name, m in (("plain", plain), ("on", on))}
    assert gap["on"] < gap["plain"]  # distilled: closer to the teacher than the same run without it
    # The teacher ran in eval mode without gradients: its weights and BatchNorm statistics are untouched.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    cost = training_cost(started)
    assert cost["teacher_images"] > 0


def test_a_distillation_weight_without_a_teacher_is_an_error():
    data = tiny_data(n_train=32)
    with pytest.raises(SipaError, match="distill_weight: distillation needs a teacher"):
        fit(tiny_model(), data, default_recipe(epochs=1, batch_size=16, distill_weight=0.5), val_split=None,
            progress=False)


def test_the_pruning_stage_distils_from_its_input(tmp_path):
    data = tiny_data(n_train=96, n_val=32, n_test=32)
    save_prepared(data, tmp_path / "data.pt")
    save_model(tmp_path / "improve.pt", _trained(data).cpu(), recipe=default_recipe(batch_size=16, lr=0.1),
               lineage=lineage_record(data, ("train",)))
    metrics = {}
    for name, recipe in (("plain", {"lr": 0.02}), ("distilled", {"lr": 0.02, "distill_weight": 0.7})):
        cfg = {"model": str(tmp_path / "improve.pt"), "data": str(tmp_path / "data.pt"), "schedule": [0.5, 0.7],
               "epochs": 1, "recipe": recipe, "max_drop": None, "out": str(tmp_path / f"{name}/prune.pt"),
               "state": str(tmp_path / f"{name}/state"), "metrics": str(tmp_path / f"{name}/prune.json"),
               "info": str(tmp_path / f"{name}/info.json"), "rounds_table": str(tmp_path / f"{name}/rounds.csv"),
               "layers_table": str(tmp_path / f"{name}/layers.csv")}
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump({"prune": cfg}))
        metrics[name] = prune(read_config(params), params_file=str(params), progress=False)
    assert "teacher_images" not in metrics["plain"]
    assert metrics["distilled"]["teacher_images"] == metrics["distilled"]["images_trained"] > 0
    assert metrics["distilled"]["sparsity"] == metrics["plain"]["sparsity"]  # the same rounds ...
    plain, _ = load_model(tmp_path / "plain/prune.pt")  # ... trained toward the teacher: other weights
    distilled, _ = load_model(tmp_path / "distilled/prune.pt")
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), distilled.state_dict().values()))
