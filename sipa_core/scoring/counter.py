"""MicroNet counting of any ``torch.nn.Module`` (the official rules and counting script,
google-research/google-research ``micronet_challenge/counting.py``).

The counter runs one forward pass on a single example under a
``TorchDispatchMode``, so it sees every dispatched tensor operation, the
functional ones too (the SE gate ``x * sigmoid(s)``, residual additions,
``x.mean``), which module hooks would miss. Module hooks are used only to
name the module each operation ran in, and to mark block ends.

Rules, per example:
* convolution / matmul output element with n = fan_in * density(weight):
  n multiplies, n - 1 additions, +1 addition for a bias;
* BatchNorm is folded (the official rule): its scale goes into the weights
  of the conv/linear before it (or, for a pre-activation BN, through the
  ReLU into the conv after it), leaving a per-channel bias: +1 addition per
  element and c parameters; nothing at all where the conv before it already
  had a bias, which absorbs it;
* activations per element: swish 3 mults + 1 add, sigmoid 2 + 1, ReLU 1 mult
  (others in ``ELEMENTWISE``); tensor products and quotients 1 mult, sums and
  differences 1 add per output element; mean / average pooling of r values:
  r - 1 adds + 1 mult per output; max pooling r - 1 adds (comparisons);
  upsampling, padding, concatenation and reshapes are free;
* bit widths (``scoring.bits.BitWidths``; a plain ``bits`` = every weight
  and activation at that width, 16 being the freebie): every parameter
  value at its layer's weight width (biases and folded BatchNorm values
  too, as in the official counter); a tensor of more than one dimension
  with zeros costs its nonzeros plus a 1-bit mask of its full shape (where
  that is cheaper than dense); biases stay dense;
* a multiplication costs mul_bits / 32: the wider of weight and activation
  width for a convolution or matrix product, the activation width for an
  elementwise one; every addition costs add_bits / 32 (32: accumulators);
* the adder-tree accounting (``add="tree"``, and ``"int"``; the 2019 winner's
  public counter, ``flops_utils_final.py``), counted beside the strict one in
  ``summary()``'s ``*_tree`` keys: a quantized conv or linear layer's accumulation, per output element
  over the n nonzero weights of its kernel, in a binary adder tree from
  operands of w + a - 1 bits (w + a where the layer's input is unsigned:
  ``BitWidths.unsigned``), the width growing by one
  bit per level (``int``: n - 1 additions at the final width); one
  multiplication per output element for its per-channel scale; a
  floating-point layer (16 bits or wider) accumulates at its width; every
  other addition (biases, activation functions, pooling, residuals) at 16
  bits (FP16). Under ``--uniform-sparsity`` a kernel keeps fan_in x density
  nonzeros on average; the cost is interpolated between the integer counts
  around it.

Operations whose inputs are all parameters or buffers (a mask applied to a
weight, a transpose of a weight) are precomputable and cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sipa_core.errors import SipaError
from sipa_core.scoring.bits import BitWidths

# Reference network (WideResNet-28-10) the scores are normalised by.
REFERENCE_PARAMS = 36.5e6
REFERENCE_BYTES = REFERENCE_PARAMS * 4  # 146 MB at 32 bits
REFERENCE_OPS = 10.49e9

# Per-element (multiplies, additions) of elementwise operations.
ELEMENTWISE = {
    "silu": (3, 1), "sigmoid": (2, 1), "relu": (1, 0), "hardtanh": (1, 0), "hardswish": (3, 1),
    "hardsigmoid": (2, 1), "leaky_relu": (2, 0), "elu": (3, 1), "celu": (3, 1), "gelu": (4, 2),
    "tanh": (2, 1), "exp": (1, 0), "mul": (1, 0), "div": (1, 0), "reciprocal": (1, 0),
    "add": (0, 1), "sub": (0, 1), "rsub": (0, 1), "neg": (1, 0), "clamp": (1, 0), "clamp_min": (1, 0),
    "clamp_max": (1, 0), "maximum": (0, 1), "minimum": (0, 1), "sqrt": (1, 0), "rsqrt": (1, 0),
}
CONVOLUTIONS = {"convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution",
                "_slow_conv2d_forward", "thnn_conv2d", "conv2d", "conv_depthwise2d", "_conv_depthwise2d"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
BATCHNORMS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
              "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_no_update", "batch_norm"}
MEANS = {"mean", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool3d"}
SUMS = {"sum"}
AVG_POOLS = {"avg_pool2d", "avg_pool1d", "avg_pool3d"}
MAX_POOLS = {"max_pool2d_with_indices", "max_pool2d", "max_pool1d", "max_pool3d_with_indices"}
SOFTMAX = {"_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax"}
# Free by the rules: data movement, shapes, padding, concatenation, nearest-neighbour upsampling,
# tensor creation and copies. Any operator in none of these sets is an error naming it
# (``UncountedOperator``), so that no score comes out low by omission.
FREE = {"view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "t", "transpose", "permute", "expand",
        "expand_as", "contiguous", "clone", "detach", "alias", "flatten", "squeeze", "unsqueeze", "cat", "stack",
        "split", "split_with_sizes", "chunk", "slice", "select", "unbind", "narrow", "constant_pad_nd", "pad",
        "reflection_pad2d", "replication_pad2d", "upsample_nearest2d", "_upsample_nearest_exact2d", "empty",
        "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "ones",
        "ones_like", "new_zeros", "full", "full_like", "fill", "zero", "_to_copy", "to", "copy", "lift_fresh",
        "as_strided", "dropout", "identity"}


class UncountedOperator(SipaError):
    """An operator the counter has no rule for (counting it as free would score the network low)."""


@dataclass
class OpCost:
    """One counted operation: where it ran, what it was, what it cost."""

    module: str
    op: str
    mults: float
    adds: float
    out_shape: tuple
    density: float = 1.0
    mul_bits: int = 32  # width of the multiplications' inputs
    # A conv or linear layer's accumulation: groups of (output elements, nonzero weights per output's
    # kernel), and the layer's (weight bits, activation bits); empty for every other operation.
    accumulation: tuple[tuple[float, float], ...] = ()
    layer_bits: tuple[int, int] = (32, 32)
    signed_input: bool = True  # the layer multiplies signed activations (adder-tree operands one bit narrower)


@dataclass
class TensorCost:
    """Storage of one parameter tensor (or a folded BatchNorm's values)."""

    name: str
    numel: int
    values: float  # stored values (nonzeros for a sparse tensor)
    bytes: float
    sparse: bool
    prunable: bool = False  # a weight of more than one dimension


@dataclass
class BlockCost:
    """Cumulative cost of the network up to and including a block's end."""

    name: str
    mults: float
    adds: float
    ops: float
    n_ops: int = 0  # the counted operations up to here: its ops under any accounting


FLOAT_BITS = 16  # a layer this wide or wider is floating point: no integer accumulation
FP16 = 16  # the width of what runs in FP16 under the int/tree accountings


def tree_bits(n: int, b0: int) -> float:
    """Bit-weighted additions of a binary adder tree over ``n`` operands of ``b0`` bits: per level
    floor(len / 2) additions at the current width, then len = ceil(len / 2) and one bit more."""
    total, width = 0, b0
    while n > 1:
        total += (n // 2) * width
        n, width = (n + 1) // 2, width + 1
    return total


def int_bits(n: int, b0: int) -> float:
    """Bit-weighted additions of a fixed-length integer accumulator: n - 1 additions at the
    width no sum of ``n`` operands of ``b0`` bits can overflow (the adder tree's final width)."""
    return (n - 1) * (b0 + math.ceil(math.log2(n))) if n > 1 else 0


def accumulation_bits(n: float, b0: int, add: str) -> float:
    """One output's accumulation over ``n`` nonzero weights (interpolated when n is an average)."""
    cost = tree_bits if add == "tree" else int_bits
    low = math.floor(n)
    f = n - low
    return (1 - f) * cost(low, b0) + (f * cost(low + 1, b0) if f else 0.0)


def _op_bits(o: OpCost, add: str) -> float:
    """An operation's bit-weighted cost under the int or tree accounting."""
    mult = o.mults * o.mul_bits
    if not o.accumulation:
        return mult + o.adds * FP16
    w, a = o.layer_bits
    acc_adds = sum(k * max(n - 1, 0) for k, n in o.accumulation)
    rest = o.adds - acc_adds
    if max(w, a) >= FLOAT_BITS:  # a floating-point layer accumulates at its own width
        return mult + acc_adds * min(max(w, a), 32) + rest * FP16
    outputs = sum(k for k, _ in o.accumulation)
    b0 = w + a - (1 if o.signed_input else 0)
    acc = sum(k * accumulation_bits(n, b0, add) for k, n in o.accumulation)
    return mult + acc + outputs * FP16 + rest * FP16  # + each output's per-channel scale


def ops_of(ops: list[OpCost], add: int | str) -> float:
    """32-bit-equivalent math ops of counted operations: each multiply at its mul_bits / 32, each
    addition at add / 32 (a width), or by the int / tree accounting."""
    if isinstance(add, str):
        return sum(_op_bits(o, add) for o in ops) / 32
    return sum(o.mults * o.mul_bits for o in ops) / 32 + sum(o.adds for o in ops) * add / 32


@dataclass
class CountResult:
    widths: BitWidths
    input_shape: tuple
    ops_list: list[OpCost]
    tensors: list[TensorCost]
    blocks: list[BlockCost] = field(default_factory=list)

    @property
    def mults(self) -> float:
        return sum(o.mults for o in self.ops_list)

    @property
    def adds(self) -> float:
        return sum(o.adds for o in self.ops_list)

    @property
    def params_bytes(self) -> float:
        return sum(t.bytes for t in self.tensors)

    @property
    def ops(self) -> float:
        return ops_of(self.ops_list, self.widths.add)

    def ops_at(self, add: int | str) -> float:
        """Math ops under another addition accounting (the same counted operations)."""
        return ops_of(self.ops_list, add)

    def block_ops_at(self, block: BlockCost, add: int | str) -> float:
        return ops_of(self.ops_list[:block.n_ops], add)

    def summary(self) -> dict:
        """The flat keys every stage writes into metrics/<stage>.json."""
        params_bytes, ops = self.params_bytes, self.ops
        numel = sum(t.numel for t in self.tensors if t.prunable)
        zeros = sum(t.numel - t.values for t in self.tensors if t.prunable)
        params_score = params_bytes / REFERENCE_BYTES
        ops_score = ops / REFERENCE_OPS
        return {
            "params": params_bytes / 4,
            "params_mb": params_bytes / 1e6,
            "params_bytes": params_bytes,
            "ops": ops,
            "mults": self.mults,
            "adds": self.adds,
            "weight_bits": self.widths.weight,
            "act_bits": self.widths.act,
            "add_bits": self.widths.add,
            "weight_sparsity": zeros / numel if numel else 0.0,
            "params_score": params_score,
            "ops_score": ops_score,
            "score": params_score + ops_score,
            **tree_keys(params_bytes, self.ops_at("tree")),
        }

    def __getitem__(self, key):
        return self.summary()[key]

    def block_ops(self) -> dict[str, float]:
        return {b.name: b.ops for b in self.blocks}

    def layer_table(self) -> list[dict]:
        """Cost per module, in execution order (rows merge ops of one module)."""
        rows: dict[str, dict] = {}
        members: dict[str, list[OpCost]] = {}
        for o in self.ops_list:
            row = rows.setdefault(o.module, {"module": o.module, "ops": [], "mults": 0.0, "adds": 0.0,
                                             "out_shape": o.out_shape})
            if o.op not in row["ops"]:
                row["ops"].append(o.op)
            row["mults"] += o.mults
            row["adds"] += o.adds
            row["out_shape"] = o.out_shape
            members.setdefault(o.module, []).append(o)
        params = {}
        for t in self.tensors:
            owner = t.name.rsplit(".", 1)[0] if "." in t.name else ""
            params[owner] = params.get(owner, 0.0) + t.bytes
        out = []
        for row in rows.values():
            row["ops"] = "+".join(row["ops"])
            row["params_bytes"] = params.pop(row["module"], 0.0)
            row["total_ops"] = ops_of(members[row["module"]], self.widths.add)
            out.append(row)
        for owner, b in params.items():  # parameters of modules that ran no counted op
            out.append({"module": owner, "ops": "", "mults": 0.0, "adds": 0.0, "out_shape": (),
                        "params_bytes": b, "total_ops": 0.0})
        return out


def tree_keys(params_bytes: float, ops_tree: float) -> dict:
    """The adder-tree accounting's keys beside the strict ones (parameters are counted alike)."""
    return {"ops_tree": ops_tree, "ops_score_tree": ops_tree / REFERENCE_OPS,
            "score_tree": params_bytes / REFERENCE_BYTES + ops_tree / REFERENCE_OPS}


def _base_name(func) -> str:
    return func.overloadpacket.__name__.rstrip("_") or func.overloadpacket.__name__


def _window(kernel, spatial_dims: int) -> int:
    """Values per pooling window; a one-number kernel size repeats over the spatial dims."""
    k = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
    if len(k) == 1:
        k = k * spatial_dims
    return math.prod(k)


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


class _Counter(TorchDispatchMode):
    def __init__(self, static: dict[int, str], widths: BitWidths, uniform: float | None, module_stack: list[str]):
        super().__init__()
        self.widths = widths
        self.static = dict(static)  # data_ptr -> tensor name, for tensors that do not depend on the input
        self.keep: list[torch.Tensor] = []  # holds tensors whose addresses we remember, so none is reused
        self.uniform = uniform
        self.stack = module_stack
        self.linear_out: dict[int, bool] = {}  # conv/matmul output address -> has a bias
        self.ops: list[OpCost] = []
        self.bn_folded: dict[int, str] = {}  # BN running_mean address -> "bias" | "merged"

    def _is_static(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.data_ptr() in self.static

    def _density(self, w: torch.Tensor) -> float:
        name = self.static.get(w.data_ptr(), "")
        return weight_density(w, self.widths.param_bits(name.rsplit(".", 1)[0]), self.uniform)

    def _record(self, op, mults, adds, out, density=1.0, weighted=False, accumulation=()):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        module = self.stack[-1] if self.stack else ""
        self.ops.append(OpCost(module, op, float(mults), float(adds), shape, density,
                               self.widths.mul_bits(module, weighted), tuple(accumulation),
                               self.widths.layer(module), self.widths.signed_input(module)))

    def _kernels(self, nonzeros, outputs: int, mean: float, d: float) -> tuple:
        """Accumulation groups (output elements, nonzeros of their kernel): per output channel for a
        sparse weight counted sparse (``nonzeros()``: its nonzeros per channel, counted only then), else
        ``mean`` (fan_in x density) for every output."""
        if nonzeros is None or d >= 1 or self.uniform is not None:
            return ((float(outputs), mean),)
        per_output = nonzeros()
        each = outputs / len(per_output)
        values, counts = torch.unique(per_output, return_counts=True)
        return tuple((each * int(c), float(v)) for v, c in zip(values.tolist(), counts.tolist()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _base_name(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = out[0] if isinstance(out, (tuple, list)) else out
        if tensors and all(self._is_static(t) for t in tensors):
            # Derived from weights alone (a masked or transposed weight): precomputable, free.
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.static[o.data_ptr()] = self.static[tensors[0].data_ptr()]
                    self.keep.append(o)
            return out
        if name in CONVOLUTIONS:
            self._conv(args, first)
        elif name in MATMULS:
            self._matmul(name, args, first)
        elif name in BATCHNORMS:
            self._batchnorm(args, first)
        elif name in MEANS:
            inp = args[0]
            self._record("mean", _numel(first), _numel(inp) - _numel(first), first)
        elif name in SUMS:
            self._record("sum", 0, _numel(args[0]) - _numel(first), first)
        elif name in AVG_POOLS or name in MAX_POOLS:
            window = _window(args[1] if len(args) > 1 else kwargs["kernel_size"], args[0].dim() - 2)
            if name in AVG_POOLS:
                self._record("avg_pool", _numel(first), (window - 1) * _numel(first), first)
            else:
                self._record("max_pool", 0, (window - 1) * _numel(first), first)
        elif name in SOFTMAX:
            self._record("softmax", 2 * _numel(first), _numel(first), first)
        elif name in ELEMENTWISE:
            m, a = ELEMENTWISE[name]
            n = _numel(first)
            self._record(name, m * n, a * n, first)
        elif name not in FREE:
            module = self.stack[-1] if self.stack else "the model"
            raise UncountedOperator(f"the MicroNet counter has no rule for operator {name!r} (in module "
                                    f"{module or 'the model'}); its cost would be left out of the score "
                                    f"(docs/scoring.md lists the counted operators)")
        if func.overloadpacket.__name__.endswith("_") and tensors:
            # An in-place op changed a conv output: a BatchNorm after it can no longer be folded.
            self.linear_out.pop(tensors[0].data_ptr(), None)
        return out

    def _remember_linear(self, out, has_bias):
        self.linear_out[out.data_ptr()] = has_bias
        self.keep.append(out)

    def _conv(self, args, out):
        x, w, bias = args[0], args[1], args[2] if len(args) > 2 else None
        transposed = bool(args[6]) if len(args) > 6 else False
        c_out = w.shape[1] * (args[8] if len(args) > 8 else 1) if transposed else w.shape[0]
        d = self._density(w)
        if transposed:  # each input element scatters into fan_out outputs
            fan = w.numel() / w.shape[0]
            mults = _numel(x) * fan * d
            adds = mults - _numel(out) + (_numel(out) if bias is not None else 0)
        else:
            fan = w.numel() / c_out
            mults = _numel(out) * fan * d
            adds = _numel(out) * (fan * d - 1 + (1 if bias is not None else 0))
        per_channel = None if transposed else (lambda: torch.count_nonzero(w.reshape(c_out, -1), dim=1))
        acc = self._kernels(per_channel, _numel(out), mults / max(_numel(out), 1), d)
        self._record("conv", mults, adds, out, d, weighted=True, accumulation=acc)
        self._remember_linear(out, bias is not None)

    def _matmul(self, name, args, out):
        if name in {"addmm", "baddbmm"}:
            bias, a, b = args[0], args[1], args[2]
        else:
            bias, a, b = None, args[0], args[1]
        weight = b if self._is_static(b) else a if self._is_static(a) else None
        d = self._density(weight) if weight is not None else 1.0
        k = a.shape[-1]
        n_out = _numel(out)
        mults = n_out * k * d
        adds = n_out * (k * d - 1 + (1 if bias is not None else 0))
        per_output = None
        if weight is not None:  # nonzeros per output feature: columns of the right operand, rows of the left
            per_output = lambda: torch.count_nonzero(weight, dim=-2 if weight is b else -1).reshape(-1)  # noqa: E731
        acc = self._kernels(per_output, n_out, k * d, d)
        self._record("linear" if weight is not None else "matmul", mults, adds, out, d, weighted=weight is not None,
                     accumulation=acc)
        self._remember_linear(out, bias is not None)

    def _batchnorm(self, args, out):
        x, running_mean = args[0], args[3] if len(args) > 3 else None
        key = running_mean.data_ptr() if isinstance(running_mean, torch.Tensor) else (
            args[1].data_ptr() if isinstance(args[1], torch.Tensor) else id(args))
        merged = self.linear_out.pop(x.data_ptr(), False)
        self.bn_folded[key] = "merged" if merged else "bias"
        self._record("bn(folded)", 0, 0 if merged else _numel(out), out)
        self._remember_linear(out, True)  # a second BN would merge into the same bias


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def weight_density(w: torch.Tensor, bits: int, uniform: float | None = None) -> float:
    """Fraction of a weight tensor's values that are stored and multiplied.

    A tensor of more than one dimension is stored sparse (nonzeros plus a
    1-bit mask) only where that is cheaper than dense storage, i.e. density
    below 1 - 1/bits; a dense tensor that happens to hold a stray zero is
    counted dense, as a real deployment would store it.
    """
    if w.dim() <= 1:
        return 1.0
    if uniform is not None:
        return 1.0 - uniform
    n = w.numel()
    d = float(torch.count_nonzero(w)) / n if n else 1.0
    return d if d < 1 - 1 / bits else 1.0


def _tensor_costs(model: nn.Module, widths: BitWidths, uniform: float | None, bn_folded: dict[int, str]):
    costs: list[TensorCost] = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        bits = widths.param_bits(mod_name)
        value_bytes = bits / 8
        if isinstance(module, _BN_TYPES):
            c = module.num_features
            ref = module.running_mean if module.running_mean is not None else module.weight
            how = bn_folded.get(ref.data_ptr() if ref is not None else -1, "bias")
            values = 0 if how == "merged" else c
            if values:
                costs.append(TensorCost(f"{prefix}bn_{how}", values, values, values * value_bytes, False))
            continue
        for pname, p in module.named_parameters(recurse=False):
            name = pname
            if pname.endswith("_orig") and hasattr(module, pname[:-5] + "_mask"):
                name = pname[:-5]  # torch.nn.utils.prune: the stored tensor is weight_orig * mask
                p = getattr(module, name)
            numel = p.numel()
            if p.dim() > 1:
                nonzero = numel * weight_density(p, bits, uniform)
                sparse = nonzero < numel
                nbytes = nonzero * value_bytes + (numel / 8 if sparse else 0)
                costs.append(TensorCost(prefix + name, numel, nonzero, nbytes, sparse, prunable=True))
            else:
                costs.append(TensorCost(prefix + name, numel, numel, numel * value_bytes, False))
    return costs


def _default_boundaries(model: nn.Module) -> list[str]:
    if hasattr(model, "boundaries"):
        return [b.name for b in model.boundaries()]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return [f"blocks.{i}" for i in range(len(blocks))]
    return []


def _checked_shape(input_shape, uniform_sparsity) -> tuple[int, ...]:
    """The (1, C, H, W) input shape, after checking the counting options."""
    if uniform_sparsity is not None and not 0 <= uniform_sparsity < 1:
        raise SipaError(f"uniform sparsity must be in [0, 1), got {uniform_sparsity}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise SipaError(f"input shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    return shape


def count(model: nn.Module, input_shape=(3, 32, 32), bits: int | BitWidths = 16,
          uniform_sparsity: float | None = None, boundaries: list[str] | None = None) -> CountResult:
    """Count a module's MicroNet parameters and math ops for one example.

    ``input_shape`` is (C, H, W) or (1, C, H, W) of the data the model is fed
    (before any upsampling inside it). ``bits``: one width for every weight and
    activation (16: the freebie), or per-layer ``BitWidths``. ``uniform_sparsity`` counts every
    tensor of more than one dimension as if it had that sparsity (the
    authors' planning estimate). ``boundaries`` names the modules whose ends
    get a cumulative cost (default: the model's blocks).
    """
    widths = BitWidths.of(bits)
    shape = _checked_shape(input_shape, uniform_sparsity)
    boundaries = _default_boundaries(model) if boundaries is None else list(boundaries)
    modules = dict(model.named_modules())
    missing = [b for b in boundaries if b not in modules]
    if missing:
        raise SipaError(f"boundary module(s) not in the model: {', '.join(missing)}")

    static = {t.data_ptr(): n for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.numel()}
    stack: list[str] = []
    counter = _Counter(static, widths, uniform_sparsity, stack)
    blocks: list[BlockCost] = []
    handles = []

    def push(name):
        return lambda mod, inp: stack.append(name)

    def pop(name):
        def hook(mod, inp, out):
            stack.pop()
            if name in boundaries:
                m = sum(o.mults for o in counter.ops)
                a = sum(o.adds for o in counter.ops)
                blocks.append(BlockCost(name, m, a, ops_of(counter.ops, widths.add), len(counter.ops)))
        return hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(push(name)))
        handles.append(mod.register_forward_hook(pop(name)))
    was_training = model.training
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    except SipaError:
        raise
    except RuntimeError as err:
        raise SipaError(f"the model cannot run on input shape {shape}: {str(err).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tensors = _tensor_costs(model, widths, uniform_sparsity, counter.bn_folded)
    return CountResult(widths, shape, counter.ops, tensors, blocks)


def expected_ops(full_ops: float, exits) -> float:
    """Expected ops per example of a network with early exits.

    ``exits`` is a sequence of (path_ops, exit_ops, ratio) in network order:
    ``path_ops`` the cost of the network up to the exit's block, ``exit_ops``
    the exit module's cost, ``ratio`` the fraction of all examples leaving
    there. A sample that leaves at exit i paid the path to it and every exit
    module up to i; the rest paid the whole network and every exit module.
    """
    total_ratio, spent_exits, expected = 0.0, 0.0, 0.0
    for path_ops, exit_ops, ratio in exits:
        if not 0 <= ratio <= 1:
            raise SipaError(f"exit ratio must be in [0, 1], got {ratio}")
        spent_exits += exit_ops
        expected += ratio * (path_ops + spent_exits)
        total_ratio += ratio
    if total_ratio > 1 + 1e-9:
        raise SipaError(f"exit ratios add up to {total_ratio:.4f} > 1")
    return expected + (1 - total_ratio) * (full_ops + spent_exits)
