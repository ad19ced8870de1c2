"""The exit's own recipe matters on real images (the CIFAR-10 folder): an exit trained with the
exit recipe (one-hot softsmoothing, no mixup) is confident on a real share of validation images;
one trained on the main network's recipe (label smoothing 0.3, mixup 1.0: the former inheritance)
cannot be, since smoothed targets cap the confidence the loss asks for (3 classes: 0.8 < 0.85)."""

import pytest
import torch

from sipa_core.accelerate.exits import EarlyExitNetwork, exit_config, softsmoothing_loss
from sipa_core.accelerate.training import exit_recipe
from sipa_core.data.prepared import load_prepared
from sipa_core.data.prepare import prepare
from sipa_core.models import create_model, create_spec
from sipa_core.train import check_recipe, fit, normalized

MAIN_RECIPE = dict(batch_size=64, lr=0.1, weight_decay=5e-4, label_smoothing=0.3, mixup_alpha=1.0)


def _share_above(net, data, threshold=0.85) -> float:
    net.eval()
    with torch.no_grad():
        x, _ = data.split("val")
        conf = net(normalized(x, data.mean, data.std)).softmax(1).amax(1)
    return float((conf > threshold).float().mean())


def _train_exit(main, data, recipe) -> EarlyExitNetwork:
    torch.manual_seed(1)
    net = EarlyExitNetwork(main, exit_config(main, 4))

    def train_mode(m):
        m.eval()
        m.exit.train()

    fit(net, data, recipe, params=list(net.exit.parameters()), loss_fn=softsmoothing_loss, train_mode=train_mode,
        val_split=None, progress=False)
    return net


@pytest.mark.slow  # real images: two exits trained on the CIFAR-10 folder
def test_exit_recipe_gives_confident_exits_where_the_inherited_one_cannot(tmp_path, cifar10_jpeg):
    prepare({"source": "imagefolder", "root": str(cifar10_jpeg), "classes": ["airplane", "automobile", "frog"],
             "val_size": 150, "images_per_class": 300, "test_images_per_class": 10,
             "out": str(tmp_path / "data.pt"), "metrics": str(tmp_path / "prepare.json"),
             "info": str(tmp_path / "prepare_info.json")}, progress=False)
    data = load_prepared(tmp_path / "data.pt")
    torch.manual_seed(0)
    main = create_model(create_spec("sipa_baseline_32", num_classes=3, image_size=32))
    main_recipe = check_recipe({**MAIN_RECIPE, "epochs": 6})
    fit(main, data, main_recipe, val_split=None, progress=False)
    main.eval()
    for p in main.parameters():
        p.requires_grad_(False)

    stage_cfg = {"recipe": {"lr": 0.05, "batch_size": 64}, "epochs": 6, "seed": 0}
    own = exit_recipe(stage_cfg, main_recipe, "params.yaml")
    assert own["label_smoothing"] == 0.0 and own["mixup_alpha"] == 0.0  # whatever the main network used
    inherited = check_recipe({**main_recipe, "ghost_batch": 0, **stage_cfg["recipe"], "epochs": 6})
    own_share = _share_above(_train_exit(main, data, own), data)
    inherited_share = _share_above(_train_exit(main, data, inherited), data)
    print(f"validation share above 0.85: exit recipe {own_share:.3f}, inherited recipe {inherited_share:.3f}")
    # Measured 0.127 against 0.000 at the current conv init (0.393 against 0.000 before it): the
    # main network trains less in 6 epochs, so fewer confident exits, but the inherited recipe
    # (label smoothing 0.3 and mixup) still leaves none above 0.85.
    assert own_share >= 0.1 and own_share > inherited_share + 0.1
