"""Small builders shared by tests: a tiny network and a tiny learnable data set."""

from dataclasses import asdict

import torch
import yaml

from sipa_core.data.prepared import FORMAT, VERSION, PreparedData
from sipa_core.io import atomic_torch_save
from sipa_core.models import create_model, efficientnet_spec

TINY_BLOCKS = ["r1_k3_s1_e1_i8_o8_se0.25", "r1_k3_s2_e2_i8_o16_se0.25"]


def tiny_model(num_classes=4, seed=0, **spec):
    torch.manual_seed(seed)
    return create_model(efficientnet_spec(TINY_BLOCKS, image_size=16, num_classes=num_classes, head=32, **spec))


def tiny_data(n_train=64, n_val=16, n_test=16, num_classes=4, size=16, seed=0) -> PreparedData:
    """Images whose mean colour depends on the class: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        y = torch.arange(n) % num_classes
        base = (y[:, None, None, None] * (200 // num_classes)).expand(n, 3, size, size)
        noise = torch.randint(0, 50, (n, 3, size, size), generator=g)
        return (base + noise).clamp(0, 255).to(torch.uint8), y

    (tx, ty), (vx, vy), (sx, sy) = part(n_train), part(n_val), part(n_test)
    return PreparedData(tx, ty, vx, vy, sx, sy, [f"c{i}" for i in range(num_classes)], [0.4] * 3, [0.25] * 3,
                        {"source": "generated", "seed": seed})


def save_prepared(data: PreparedData, path) -> None:
    """Write ``data`` in the prepare stage's file format."""
    atomic_torch_save(path, {"format": FORMAT, "version": VERSION, **asdict(data)})


def tiny_arch_yaml(path, num_classes=4) -> None:
    spec = efficientnet_spec(TINY_BLOCKS, image_size=16, num_classes=num_classes, head=32)
    path.write_text(yaml.safe_dump(spec))
