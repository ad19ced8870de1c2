"""The authors' CIFAR-100 augmentation policy (their public code, Lee-Gihun/MicroNet_OSI-AI), per
image and batched.

25 sub-policies of two ops each, searched with HyperOpt by the authors. Every
IMAGE draws one sub-policy uniformly; op1 applies with probability p1, then
op2 with probability p2. Shear, translate and the four enhance ops take a
random sign per image; shear, translate and rotate fill with grey 128.

Batched: after the per-image draws, each op is applied once to the images
that drew it with the same sign (at most 25 x 2 x 2 calls of a batched
torchvision kernel per batch), on whatever device the batch lives on. The
draws come from the engine's data generator, which is checkpointed, so a
resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math

import torch
from torchvision.transforms.v2.functional._geometry import (_affine_grid, _apply_grid_transform,
                                                            _get_inverse_affine_matrix)
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2 import InterpolationMode

FILL = [128.0, 128.0, 128.0]

# (p1, op1, m1, p2, op2, m2), as in the authors' public code.
SUBPOLICIES = [
    (0.9879, "solarize", 1, 0.0387, "rotate", 8), (0.5907, "autocontrast", 2, 0.0777, "shearX", 9),
    (0.1806, "contrast", 3, 0.6762, "translateY", 1), (0.4678, "posterize", 0, 0.5506, "contrast", 2),
    (0.7938, "solarize", 4, 0.3125, "shearY", 2), (0.3417, "translateY", 8, 0.2643, "sharpness", 5),
    (0.6481, "shearX", 5, 0.2030, "shearY", 9), (0.1147, "color", 3, 0.9132, "autocontrast", 6),
    (0.4558, "shearY", 0, 0.8893, "brightness", 5), (0.9959, "translateX", 1, 0.5779, "solarize", 6),
    (0.4201, "sharpness", 5, 0.5383, "brightness", 4), (0.6410, "shearY", 7, 0.5017, "autocontrast", 4),
    (0.6463, "translateX", 4, 0.2738, "solarize", 4), (0.9323, "translateX", 5, 0.7434, "sharpness", 2),
    (0.5576, "invert", 4, 0.2230, "brightness", 4), (0.5397, "color", 4, 0.4765, "equalize", 6),
    (0.6940, "shearY", 4, 0.5243, "color", 4), (0.6019, "solarize", 1, 0.3977, "shearY", 7),
    (0.9534, "equalize", 8, 0.3650, "equalize", 6), (0.1890, "translateX", 3, 0.5527, "sharpness", 0),
    (0.9786, "shearX", 4, 0.3082, "rotate", 7), (0.4671, "contrast", 8, 0.5407, "translateY", 9),
    (0.1324, "shearY", 9, 0.5511, "brightness", 6), (0.3967, "rotate", 3, 0.9258, "posterize", 1),
    (0.7877, "contrast", 7, 0.0678, "invert", 8),
]
SIGNED = {"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"}


def _linspace(start: float, stop: float, m: int) -> float:
    return start + (stop - start) * m / 9


def magnitude(op: str, m: int, image_size: int = 32) -> float:
    """The value of magnitude index ``m`` (0..9) for ``op``, before any sign."""
    if op in ("shearX", "shearY"):
        return _linspace(0.0, 0.3, m)
    if op in ("translateX", "translateY"):
        return _linspace(0.0, 150 / 331, m) * image_size
    if op == "rotate":
        return _linspace(0.0, 30.0, m)
    if op in ("color", "contrast", "sharpness", "brightness"):
        return _linspace(0.0, 0.9, m)
    if op == "posterize":
        return float(round(_linspace(8.0, 4.0, m)))
    if op == "solarize":
        return _linspace(256.0, 0.0, m)
    return 0.0  # autocontrast, equalize, invert


def apply_op(x: torch.Tensor, op: str, m: int, sign: int = 1) -> torch.Tensor:
    """``op`` at magnitude index ``m`` (with ``sign`` where the op is signed) on a uint8 batch."""
    v = magnitude(op, m, x.shape[-1]) * (sign if op in SIGNED else 1)
    nearest = InterpolationMode.NEAREST
    if op in ("shearX", "shearY"):  # PIL-style shear about the origin, as torchvision's AutoAugment
        shear = [math.degrees(math.atan(v)), 0.0] if op == "shearX" else [0.0, math.degrees(math.atan(v))]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                         fill=FILL, center=[0, 0])
    if op in ("translateX", "translateY"):
        shift = [int(v), 0] if op == "translateX" else [0, int(v)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                         fill=FILL)
    if op == "rotate":
        return TF.rotate(x, v, interpolation=nearest, fill=FILL)
    if op == "color":
        return TF.adjust_saturation(x, 1.0 + v)
    if op == "contrast":
        return TF.adjust_contrast(x, 1.0 + v)
    if op == "sharpness":
        return TF.adjust_sharpness(x, 1.0 + v)
    if op == "brightness":
        return TF.adjust_brightness(x, 1.0 + v)
    if op == "posterize":
        return TF.posterize(x, int(v))
    if op == "solarize":  # PIL's: invert every value >= the threshold (256: none)
        return torch.where(x >= v, 255 - x, x)
    if op == "autocontrast":
        return TF.autocontrast(x)
    if op == "equalize":
        return TF.equalize(x)
    if op == "invert":
        return TF.invert(x)
    raise ValueError(f"unknown op {op!r}")


class SipaPolicy:
    """The authors' CIFAR-100 policy: one sub-policy per image, batched per (op, sign)."""

    @staticmethod
    def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: the sub-policy index, whether each of its two ops applies, and each op's sign."""
        choice = torch.randint(0, len(SUBPOLICIES), (n,), generator=gen)
        draws = torch.rand(n, 2, generator=gen)
        signs = torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1
        return choice, draws < _PROBS[choice], signs

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        choice, apply, signs = self.draw(x.shape[0], gen)
        out = x.clone()
        for slot in (0, 1):  # every image's op1 before any op2: each image sees op1 then op2
            groups = _groups(choice, apply[:, slot], signs[:, slot], slot)
            geometric = {k: v for k, v in groups.items() if k[0] in GEOMETRIC}
            if geometric:
                _apply_geometric(out, geometric)
            for (op, m, sign), idx in groups.items():
                if op not in GEOMETRIC:
                    idx = idx.to(x.device)
                    out[idx] = apply_op(out[idx], op, m, sign)
        return out


# Per slot: the distinct (op, magnitude) pairs of the table, and each sub-policy's pair index.
_PAIRS = [sorted({(p[1 + 3 * slot], p[2 + 3 * slot]) for p in SUBPOLICIES}) for slot in (0, 1)]
_PAIR_OF = [torch.tensor([_PAIRS[slot].index((p[1 + 3 * slot], p[2 + 3 * slot])) for p in SUBPOLICIES])
            for slot in (0, 1)]


def _groups(choice: torch.Tensor, applies: torch.Tensor, signs: torch.Tensor, slot: int) -> dict:
    """(op, m, sign) -> indices of the images that apply it in this slot (sign 1 for unsigned ops)."""
    idx = applies.nonzero().squeeze(1)
    pair = _PAIR_OF[slot][choice[idx]]
    signed = torch.tensor([op in SIGNED for op, _ in _PAIRS[slot]])[pair]
    key = pair * 2 + torch.where(signed, (signs[idx] > 0).long(), 1)
    order = key.argsort(stable=True)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    out = {}
    for k, part in zip(keys.tolist(), idx[order].split(counts.tolist())):
        op, m = _PAIRS[slot][k // 2]
        out[(op, m, 1 if k % 2 else -1)] = part
    return out


GEOMETRIC = {"shearX", "shearY", "translateX", "translateY", "rotate"}
_PROBS = torch.tensor([[p[0], p[3]] for p in SUBPOLICIES])


@functools.lru_cache(maxsize=512)
def _grid(op: str, m: int, sign: int, h: int, w: int, device: str) -> torch.Tensor:
    """The sampling grid of a geometric op, computed as torchvision's affine/rotate kernels do."""
    v = magnitude(op, m, w) * (sign if op in SIGNED else 1)
    if op == "rotate":
        matrix = _get_inverse_affine_matrix([0.0, 0.0], -(v % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    elif op in ("shearX", "shearY"):
        deg = math.degrees(math.atan(v))
        shear = [deg, 0.0] if op == "shearX" else [0.0, deg]
        matrix = _get_inverse_affine_matrix([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], 1.0, shear)
    else:
        shift = [float(int(v)), 0.0] if op == "translateX" else [0.0, float(int(v))]
        matrix = _get_inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])
    theta = torch.tensor(matrix, dtype=torch.float32, device=device).reshape(1, 2, 3)
    return _affine_grid(theta, w=w, h=h, ow=w, oh=h)


def _apply_geometric(out: torch.Tensor, groups: dict) -> None:
    """Every geometric op of a slot in one grid sample: each image with its own op's grid."""
    h, w = out.shape[-2:]
    idx = torch.cat(list(groups.values())).to(out.device)
    grids = torch.cat([_grid(op, m, sign, h, w, str(out.device)).expand(len(ids), -1, -1, -1)
                       for (op, m, sign), ids in groups.items()])
    out[idx] = _apply_grid_transform(out[idx], grids, "nearest", fill=FILL)
