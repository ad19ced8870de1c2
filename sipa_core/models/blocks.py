"""EfficientNet block strings, decoded and encoded in one place.

A block string such as ``r2_k3_s2_e6_i24_o40_se0.2`` describes one stage of
MBConv blocks: repeats, kernel, stride (of the first repeat), expansion ratio,
input and output channels, squeeze-excitation ratio. ``s22``/``s11`` (the
original EfficientNet's two-digit strides) are accepted for square strides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from sipa_core.errors import SipaError

_TOKEN = re.compile(r"^(se|noskip|[a-z])(.*)$")


@dataclass(frozen=True)
class BlockArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    se_ratio: float | None = None
    skip: bool = True

    def encode(self) -> str:
        parts = [f"r{self.repeats}", f"k{self.kernel}", f"s{self.stride}", f"e{self.expand}",
                 f"i{self.in_ch}", f"o{self.out_ch}"]
        if self.se_ratio:
            parts.append(f"se{self.se_ratio:g}")
        if not self.skip:
            parts.append("noskip")
        return "_".join(parts)


def decode_block(text: str) -> BlockArgs:
    """Parse one block string; any malformed part is a SipaError naming it."""
    if not isinstance(text, str) or not text:
        raise SipaError(f"malformed block string {text!r}: expected e.g. 'r2_k3_s2_e6_i24_o40_se0.2'")
    fields: dict[str, str] = {}
    skip = True
    for part in text.split("_"):
        m = _TOKEN.match(part)
        if part == "noskip":
            skip = False
            continue
        if not m or m.group(1) not in {"r", "k", "s", "e", "i", "o", "se"} or m.group(1) in fields:
            raise SipaError(f"malformed block string {text!r}: unknown or repeated part {part!r}")
        fields[m.group(1)] = m.group(2)
    missing = [k for k in "rksei" + "o" if k not in fields]
    if missing:
        raise SipaError(f"malformed block string {text!r}: missing part(s) {', '.join(missing)}")

    def integer(key: str, value: str, low: int = 1) -> int:
        if key == "s" and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if not value.isdigit() or int(value) < low:
            raise SipaError(f"malformed block string {text!r}: {key}{value} must be an integer >= {low}")
        return int(value)

    se = None
    if "se" in fields:
        try:
            se = float(fields["se"])
        except ValueError:
            raise SipaError(f"malformed block string {text!r}: se{fields['se']} is not a number") from None
        if not 0 < se <= 1:
            raise SipaError(f"malformed block string {text!r}: se ratio must be in (0, 1]")
    args = BlockArgs(
        repeats=integer("r", fields["r"]), kernel=integer("k", fields["k"]),
        stride=integer("s", fields["s"]), expand=integer("e", fields["e"]),
        in_ch=integer("i", fields["i"]), out_ch=integer("o", fields["o"]), se_ratio=se, skip=skip,
    )
    if args.stride > args.kernel and args.kernel > 1:
        raise SipaError(f"malformed block string {text!r}: stride {args.stride} larger than kernel {args.kernel}")
    return args


def decode_blocks(strings) -> list[BlockArgs]:
    if isinstance(strings, str) or not strings:
        raise SipaError("blocks: expected a non-empty list of block strings")
    return [decode_block(s) for s in strings]


def round_filters(channels: float, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: nearest multiple of ``divisor``, never below 90%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def scale_blocks(blocks: list[BlockArgs], width: float, depth: float) -> list[BlockArgs]:
    return [replace(b, in_ch=round_filters(b.in_ch, width), out_ch=round_filters(b.out_ch, width),
                    repeats=round_repeats(b.repeats, depth)) for b in blocks]
