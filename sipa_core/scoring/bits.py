"""The bit widths the MicroNet counter charges, per layer.

The official rules: a parameter costs its own bit width (plus the 1-bit mask
of a sparse tensor); a multiplication costs mul_bits / 32, where mul_bits is
the width of its inputs (the wider of weight and activation for a
convolution or a matrix product, the activation width for an elementwise
product: activation functions, the SE gate, pooling's division); an
addition costs add_bits / 32 (the accumulator, 32 unless the model really
accumulates narrower). The 16-bit freebie is the same rule with every
weight and activation at 16 bits.

``add`` is the accounting of the additions (the MicroNet rules let an entry count additions at the
width it accumulates at; the 2019 winner's public counter offers these accountings): a width
(32, the strict accounting; 16, FP16 accumulation; any width 1..32) for
every addition, or ``"int"`` / ``"tree"``, the accountings the 2019 entries
used: a conv or linear layer's accumulation over the n nonzero weights of an
output's kernel as n - 1 additions at the width of a fixed-length integer
that cannot overflow (``int``) or level by level in a binary adder tree
(``tree``), from operands of weight + activation bits (less one where the
layer's integer input is signed; ``unsigned`` names the layers whose input
is not); the other additions at 16 bits (FP16).

Layers are named by module-name patterns (``fnmatch``; a pattern also
covers every module under it: ``stem`` matches ``stem.0``), first match wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from sipa_core.errors import SipaError


ADD_ACCOUNTINGS = ("int", "tree")  # besides a width: the accumulation counted as integer adders


def parse_add(value) -> int | str:
    """An addition accounting from a params value or a command-line string: 1..32, ``int`` or ``tree``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value in ADD_ACCOUNTINGS or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 32):
        return value
    raise SipaError(f"addition accounting must be a width from 1 to 32, int or tree, got {value!r}")


def _check_width(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        raise SipaError(f"{what} must be an integer from 1 to 32, got {value!r}")
    return value


def module_matches(pattern: str, module: str) -> bool:
    """``pattern`` names ``module`` or a module it lies under."""
    return fnmatchcase(module, pattern) or fnmatchcase(module, pattern + ".*")


@dataclass(frozen=True)
class BitWidths:
    """Default weight and activation widths, the accumulator width, and per-layer
    overrides ``((pattern, weight bits, act bits), ...)``."""

    weight: int = 16
    act: int = 16
    add: int | str = 32  # a width for every addition, or "int" / "tree" (ADD_ACCOUNTINGS)
    overrides: tuple[tuple[str, int, int], ...] = ()
    elementwise: int | None = None  # elementwise products' width when not the activation width
    unsigned: tuple[str, ...] = ()  # layers whose integer input is unsigned (adder tree operands one bit wider)

    def __post_init__(self):
        _check_width(self.weight, "weight bits")
        _check_width(self.act, "activation bits")
        parse_add(self.add)
        if self.elementwise is not None:
            _check_width(self.elementwise, "elementwise product bits")
        for pattern, w, a in self.overrides:
            _check_width(w, f"weight bits of {pattern!r}")
            _check_width(a, f"activation bits of {pattern!r}")

    @classmethod
    def uniform(cls, bits: int) -> BitWidths:
        """Every weight and activation at ``bits`` (16: the freebie), 32-bit accumulation."""
        return cls(_check_width(bits, "bits"), bits, 32)

    @classmethod
    def of(cls, bits: int | BitWidths) -> BitWidths:
        return bits if isinstance(bits, BitWidths) else cls.uniform(bits)

    def layer(self, module: str) -> tuple[int, int]:
        """(weight bits, activation bits) of the layer ``module`` belongs to."""
        for pattern, w, a in self.overrides:
            if module_matches(pattern, module):
                return w, a
        return self.weight, self.act

    def signed_input(self, module: str) -> bool:
        """Whether the layer ``module`` belongs to multiplies signed activations."""
        return not any(module_matches(p, module) for p in self.unsigned)

    def param_bits(self, module: str) -> int:
        return self.layer(module)[0]

    def mul_bits(self, module: str, weighted: bool) -> int:
        """Width of a multiplication's inputs: the wider of weight and activation for a
        product with a weight, the activation width for an elementwise product."""
        w, a = self.layer(module)
        if weighted:
            return max(w, a)
        return self.elementwise if self.elementwise is not None else a

    def unmatched(self, modules) -> list[str]:
        """Override patterns that name none of ``modules``."""
        names = list(modules)
        return [p for p, _, _ in self.overrides if not any(module_matches(p, m) for m in names)]

    def label(self) -> str:
        """``W4A4``, ``W4A4 (stem, classifier: W8A8)``; ``+ add 16`` when the accumulator is narrower."""
        text = f"W{self.weight}A{self.act}"
        if self.overrides:
            text += " (" + "; ".join(f"{p}: W{w}A{a}" for p, w, a in self.overrides) + ")"
        if self.elementwise is not None:
            text += f", elementwise {self.elementwise}"
        return text + (f" + add {self.add}" if self.add != 32 else "")

    def as_dict(self) -> dict:
        return {"weight": self.weight, "act": self.act, "add": self.add,
                "overrides": [[p, w, a] for p, w, a in self.overrides], "elementwise": self.elementwise,
                "unsigned": list(self.unsigned)}

    @classmethod
    def from_dict(cls, d: dict) -> BitWidths:
        return cls(int(d["weight"]), int(d["act"]), parse_add(d.get("add", 32)),
                   tuple((str(p), int(w), int(a)) for p, w, a in d.get("overrides", [])),
                   None if d.get("elementwise") is None else int(d["elementwise"]),
                   tuple(str(n) for n in d.get("unsigned", ())))

    def without_overrides(self) -> BitWidths:
        """The default widths only (for a module counted on its own, such as an exit: the unsigned
        layers, named in the main network, are not carried over)."""
        return BitWidths(self.weight, self.act, self.add, (), self.elementwise)
