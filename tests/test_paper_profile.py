"""The RESOLVED paper profile, item by item, against the paper (Appendix A) and the authors'
public code (GitHub Lee-Gihun/MicroNet_OSI-AI): what a user who runs
`make profile-paper && make repro` will really train."""

import math
from pathlib import Path

import pytest
import torch

from sipa_core.accelerate.exits import exit_config
from sipa_core.models import create_model, create_spec
from sipa_core.pipeline import STAGES, inactive_keys, resolved_trainings
from sipa_core.prune.stage import PAPER_SCHEDULE

PAPER = str(Path(__file__).resolve().parents[1] / "profiles" / "paper.yaml")


@pytest.fixture(scope="module")
def cfg():
    return {name: stage.read_config(PAPER) for name, stage in STAGES.items()}


@pytest.fixture(scope="module")
def trainings():
    return resolved_trainings(PAPER)


def test_data_is_cifar100_with_a_validation_split(cfg):
    assert cfg["prepare"]["source"] == "cifar100" and cfg["prepare"]["val_size"] == 5000
    assert cfg["prepare"]["images_per_class"] is None and cfg["prepare"]["test_images_per_class"] is None


def test_improving_recipe_is_the_authors(trainings):
    final = trainings["improve"]["final"]["recipe"]
    assert final["lr"] == 0.13 and final["momentum"] == 0.9 and not final["nesterov"]
    assert final["weight_decay"] == 1e-5 and final["no_bias_decay"] and not final["no_bn_decay"]
    assert final["batch_size"] == 128 and final["epochs"] == 1200
    assert final["schedule"] == "cosine" and final["lr_min"] == 0.0 and final["warmup_epochs"] == 0
    assert final["label_smoothing"] == 0.3 and final["mixup_alpha"] == 1.0 and final["cutmix_alpha"] == 0.0
    assert final["ghost_batch"] == 32 and final["batch_size"] // final["ghost_batch"] == 4
    assert final["activation"] == "swish"
    assert final["augment"] == "sipa_cifar100"  # the authors' own CIFAR-100 policy, per image
    assert final["crop_padding"] == 4 and final["flip"]


def test_the_network_is_the_searched_baseline_at_63_px(cfg):
    assert cfg["search"]["method"] == "preset" and cfg["search"]["preset"] == "sipa_baseline"
    spec = create_spec("sipa_baseline", num_classes=100, image_size=32)
    assert (spec["width"], spec["depth"], spec["resolution"]) == (0.9, 1.0, 1.96)
    assert math.ceil(32 * spec["resolution"]) == 63
    model = create_model(spec).eval()
    seen = []
    model.stem.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    model(torch.zeros(1, 3, 32, 32))
    assert seen == [(63, 63)]


def test_pruning_is_the_papers_eleven_rounds_of_600_epochs(cfg, trainings):
    prune = cfg["prune"]
    assert prune["schedule"] == PAPER_SCHEDULE == [0.1, 0.2, 0.3, 0.4, 0.5, 0.525, 0.55, 0.575, 0.6, 0.62, 0.64]
    assert prune["granularity"] == "weight" and prune["scope"] == "global" and prune["normalize"] == "l2"
    assert prune["retrain"] == "finetune" and prune["epochs"] == 600
    (rounds,) = trainings["prune"].values()
    assert rounds["epochs"] == 600 and rounds["lr"] == 0.13 and rounds["label_smoothing"] == 0.3  # improve's recipe


def test_exit_after_block_4_with_width_136_and_its_own_recipe(cfg, trainings):
    acc = cfg["accelerate"]
    assert acc["positions"] == [4] and acc["loss"] == "softsmoothing" and acc["epochs"] == 800
    main = create_model(create_spec("sipa_baseline", num_classes=100, image_size=32))
    ecfg = exit_config(main, 4, acc["width"], acc["kernel"])
    assert ecfg.width == 136 and ecfg.channels == 48 and ecfg.size == 15
    exit_recipe = trainings["accelerate"]["exit after block 4"]
    assert exit_recipe["label_smoothing"] == 0.0  # one-hot softsmoothing targets
    assert exit_recipe["mixup_alpha"] == 0.0 and exit_recipe["cutmix_alpha"] == 0.0
    assert exit_recipe["lr"] == 0.13 and exit_recipe["weight_decay"] == 1e-5 and exit_recipe["schedule"] == "cosine"
    assert exit_recipe["epochs"] == 800 and exit_recipe["ghost_batch"] == 0
    assert acc["thresholds"][0] == 0.5 and acc["thresholds"][-1] == 0.99 and len(acc["thresholds"]) == 50


def test_exit_path_is_pruned_gradually_to_half_and_stabilised(cfg, trainings):
    acc = cfg["accelerate"]
    assert acc["exit_schedule"][-1] == 0.5 and len(acc["exit_schedule"]) > 1 and acc["exit_prune_epochs"] > 0
    assert acc["exit_stabilize_epochs"] > 0 and acc["exit_stabilize_lr"] < 0.13
    assert trainings["accelerate"]["exit stabilisation"]["epochs"] == acc["exit_stabilize_epochs"]


def test_choices_are_made_on_a_split_no_stage_trains_on(cfg, trainings):
    """Validation is never trained on; the pruning round and the exit threshold are chosen on it."""
    trained = set(trainings["improve"]["final"]["splits"])
    assert "val" not in trained and "no_validation" not in cfg["improve"]["adopt"]
    assert cfg["prune"]["select_split"] == "val"
    assert cfg["prune"]["min_accuracy"] == 0.80 and cfg["accelerate"]["min_accuracy"] == 0.80


def test_the_paper_profile_carries_no_inactive_key():
    assert inactive_keys(PAPER) == []
