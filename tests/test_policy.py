"""The authors' CIFAR-100 policy (their public code, Lee-Gihun/MicroNet_OSI-AI, policy "cifar100"):
per-image draws, batched ops, the table."""

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sipa_core.train.sipa_policy import SIGNED, SUBPOLICIES, SipaPolicy, apply_op, magnitude


def _image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)


def test_the_table_has_25_sub_policies_of_known_ops():
    ops = {"shearX", "shearY", "translateX", "translateY", "rotate", "color", "contrast", "sharpness", "brightness",
           "posterize", "solarize", "autocontrast", "equalize", "invert"}
    assert len(SUBPOLICIES) == 25
    for p1, op1, m1, p2, op2, m2 in SUBPOLICIES:
        assert op1 in ops and op2 in ops and 0 <= m1 <= 9 and 0 <= m2 <= 9 and 0 < p1 < 1 and 0 < p2 < 1
    assert SUBPOLICIES[0] == (0.9879, "solarize", 1, 0.0387, "rotate", 8)
    assert SUBPOLICIES[24] == (0.7877, "contrast", 7, 0.0678, "invert", 8)


def test_every_image_draws_its_own_sub_policy_uniformly():
    choice, apply, signs = SipaPolicy.draw(25 * 400, torch.Generator().manual_seed(0))
    counts = torch.bincount(choice, minlength=25)
    # 400 expected per sub-policy; sd = sqrt(400 * 24/25) ~ 19.6: within 4 sd.
    assert int(counts.min()) > 320 and int(counts.max()) < 480
    # op1 of sub-policy 1 applies with p 0.9879, op2 of sub-policy 25 with p 0.0678
    assert apply[choice == 0, 0].float().mean() == pytest.approx(0.9879, abs=0.03)
    assert apply[choice == 24, 1].float().mean() == pytest.approx(0.0678, abs=0.04)
    assert set(signs.unique().tolist()) == {-1, 1}


def test_two_images_of_one_batch_can_differ():
    x = _image().repeat(64, 1, 1, 1)
    out = SipaPolicy()(x, torch.Generator().manual_seed(1))
    distinct = {bytes(img.flatten().tolist()) for img in out}
    assert len(distinct) > 10  # identical inputs, different per-image ops


def test_the_batched_policy_equals_the_ops_applied_image_by_image():
    x = torch.cat([_image(s) for s in range(32)])
    gen = torch.Generator().manual_seed(3)
    out = SipaPolicy()(x, gen)
    choice, apply, signs = SipaPolicy.draw(32, torch.Generator().manual_seed(3))
    for i in range(32):
        img = x[i:i + 1]
        p = SUBPOLICIES[int(choice[i])]
        for slot in (0, 1):
            if apply[i, slot]:
                img = apply_op(img, p[1 + 3 * slot], p[2 + 3 * slot], int(signs[i, slot]))
        assert torch.equal(out[i:i + 1], img), i


def _expected(x, op, m, sign):
    """The table's op at index m, computed here from the policy's magnitude formulas."""
    lin = lambda a, b: a + (b - a) * m / 9  # noqa: E731  np.linspace(a, b, 10)[m]
    fill, nearest = [128.0] * 3, InterpolationMode.NEAREST
    if op == "translateX" or op == "translateY":
        px = int(lin(0, 150 / 331) * 32) * sign
        out = torch.full_like(x, 128)
        if op == "translateX":
            if px >= 0:
                out[..., :, px:] = x[..., :, :32 - px]
            else:
                out[..., :, :32 + px] = x[..., :, -px:]
        else:
            if px >= 0:
                out[..., px:, :] = x[..., :32 - px, :]
            else:
                out[..., :32 + px, :] = x[..., -px:, :]
        return out
    if op in ("shearX", "shearY"):
        deg = math.degrees(math.atan(lin(0, 0.3) * sign))
        shear = [deg, 0.0] if op == "shearX" else [0.0, deg]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=fill,
                         center=[0, 0])
    if op == "rotate":
        return TF.rotate(x, lin(0, 30), interpolation=nearest, fill=fill)
    if op in ("color", "contrast", "sharpness", "brightness"):
        f = {"color": TF.adjust_saturation, "contrast": TF.adjust_contrast, "sharpness": TF.adjust_sharpness,
             "brightness": TF.adjust_brightness}[op]
        return f(x, 1 + lin(0, 0.9) * sign)
    if op == "posterize":
        bits = round(lin(8, 4))
        return x & (0xFF ^ ((1 << (8 - bits)) - 1))
    if op == "solarize":
        return torch.where(x >= lin(256, 0), 255 - x, x)
    if op == "invert":
        return 255 - x
    return {"autocontrast": TF.autocontrast, "equalize": TF.equalize}[op](x)


@pytest.mark.parametrize("op", ["shearX", "shearY", "translateX", "translateY", "rotate", "color", "contrast",
                                "sharpness", "brightness", "posterize", "solarize", "autocontrast", "equalize",
                                "invert"])
def test_each_op_at_each_magnitude_index_equals_the_table(op):
    x = _image(7)
    for m in range(10):
        for sign in ((-1, 1) if op in SIGNED else (1,)):
            assert torch.equal(apply_op(x, op, m, sign), _expected(x, op, m, sign)), (op, m, sign)
    assert magnitude("rotate", 9) == 30.0 and magnitude("posterize", 0) == 8 and magnitude("posterize", 9) == 4
    assert magnitude("translateX", 9) == pytest.approx(150 / 331 * 32)
