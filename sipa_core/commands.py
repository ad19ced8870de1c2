"""What the ``sipa`` subcommands do (``cli.py`` parses; this module runs them).

Kept apart from the parser so that ``sipa --help`` and a mistyped option answer at
once, without importing torch and every stage."""

from __future__ import annotations

import json
import sys

import yaml

from sipa_core.accelerate.exits import EarlyExitNetwork, exit_config, exit_cost
from sipa_core.accelerate.record import ExitRecord, float_exit_network
from sipa_core.checkpoint import build_model, create_spec_from, read_checkpoint
from sipa_core.config_reference import check_file, configuration_reference
from sipa_core.errors import SipaError
from sipa_core.models import ARCHITECTURES, create_model, create_spec
from sipa_core.entry_points import entry_point_of, trust_entry_point
from sipa_core.pipeline import check_params, inactive_keys, resolved_trainings
from sipa_core.plan import format_plan, measure_throughput, plan
from sipa_core.prune.masks import apply_masks, magnitude_masks, masks_from_zeros
from sipa_core.quantize.qat import float_twin
from sipa_core.quantize.record import load_quantized
from sipa_core.scoring import BitWidths, count


def _fmt(n: float) -> str:
    return f"{n:,.0f}" if abs(n - round(n)) < 1e-6 else f"{n:,.2f}"


def format_report(result, name: str, layers: bool) -> str:
    s = result.summary()
    lines = []
    if layers:
        rows = result.layer_table()
        width = max([len("module")] + [len(r["module"] or "(model)") for r in rows])
        lines.append(f"{'module':<{width}}  {'ops':<22} {'mults':>14} {'adds':>14} {'params bytes':>13}")
        for r in rows:
            lines.append(f"{r['module'] or '(model)':<{width}}  {r['ops'][:22]:<22} {_fmt(r['mults']):>14} "
                         f"{_fmt(r['adds']):>14} {_fmt(r['params_bytes']):>13}")
        lines.append("")
    if result.blocks:
        lines.append("cumulative ops at block ends: " + ", ".join(
            f"{b.name.split('.')[-1]}:{b.ops / 1e6:.3f}M" for b in result.blocks))
    lines += [
        f"model           {name}  (input {tuple(result.input_shape[1:])}, {result.widths.label()})",
        f"parameters      {_fmt(s['params'])} (32-bit equivalent), {s['params_mb']:.6f} MB,"
        f" weight sparsity {s['weight_sparsity']:.2%}",
        f"math ops        {_fmt(s['ops'])} (32-bit equivalent) = {_fmt(s['mults'])} mults at their input widths"
        f" + {_fmt(s['adds'])} adds " + (f"x {result.widths.add}/32" if isinstance(result.widths.add, int)
                                         else f"by the {result.widths.add} accounting"),
        f"params score    {s['params_score']:.6f}",
        f"ops score       {s['ops_score']:.6f}",
        f"score           {s['score']:.6f}   (WideResNet-28-10 = 2.0: 1.0 + 1.0)",
        f"adder tree      ops {_fmt(s['ops_tree'])}, ops score {s['ops_score_tree']:.6f}, score {s['score_tree']:.6f}"
        f"   (the 2019 entries' accounting of a layer's accumulation)",
    ]
    return "\n".join(lines)


def bit_widths(args, model):
    """The counted widths from --bits/--weight-bits/--act-bits/--add-bits/--layer-bits; a
    --layer-bits pattern that names no module of ``model`` is an error."""
    if getattr(args, "checkpoint_widths", None) is not None:
        return args.checkpoint_widths
    overrides = []
    for item in args.layer_bits:
        pattern, _, widths = item.partition("=")
        w, _, a = widths.partition(":")
        if not pattern or not w.isdigit() or (a and not a.isdigit()):
            raise SipaError(f"sipa score: --layer-bits {item!r}: expected PATTERN=W or PATTERN=W:A")
        overrides.append((pattern, int(w), int(a or w)))
    weight = args.bits if args.weight_bits is None else args.weight_bits
    act = args.bits if args.act_bits is None else args.act_bits
    try:
        widths = BitWidths(weight, act, args.add_bits, tuple(overrides))
    except SipaError as err:
        raise SipaError(f"sipa score: {err}") from None
    unmatched = widths.unmatched(name for name, _ in model.named_modules())
    if unmatched:
        raise SipaError(f"sipa score: --layer-bits {unmatched[0]!r} matches no module of the model "
                        f"(module names: sipa score --layers)")
    return widths


def _score_input_size(args, model) -> int:
    """The input size to count at: the network's own (``--input-size`` built it with ``--arch``; a
    checkpoint's network was built for one size, and another is refused rather than counted wrong)."""
    own = model.spec.get("image_size", 32)
    if args.input_size is not None and args.input_size != own:
        raise SipaError(f"sipa score: --input-size {args.input_size}: {args.checkpoint} holds a network built for "
                        f"{own}x{own} inputs (leave --input-size out)")
    return own


def _checkpoint_network(args, spec):
    """(model, exit network or None, exit ratio) of ``--checkpoint``: a floating-point network, or
    a quantized one counted on its quantized values (the float twin) at its own widths."""
    ckpt = read_checkpoint(args.checkpoint)
    if ckpt.quantized:
        loaded = load_quantized(args.checkpoint)
        _counted_at_own_widths(args, loaded.record)
        model = float_twin(loaded.main)
        net = None if loaded.net is None else EarlyExitNetwork(model, loaded.net.exit_cfg, float_twin(loaded.net.exit))
        return model, net, loaded.exit.exit_ratio if loaded.exit else None
    model = build_model(ckpt, spec)
    record = ExitRecord.of(ckpt)
    if record is None:
        return model, None, None
    return model, float_exit_network(model, record, args.checkpoint), record.exit_ratio


def cmd_score(args) -> int:
    if args.arch is None and args.checkpoint is None:
        raise SipaError("sipa score: give --arch NAME (or a spec .yaml) and/or --checkpoint PATH")
    if args.input_size is not None and args.input_size < 1:
        raise SipaError(f"sipa score: --input-size must be a positive number of pixels, got {args.input_size}")
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.input_size is not None and args.arch and not args.checkpoint:
        overrides["image_size"] = args.input_size  # the network as built for that data (as a stage builds it)
    named = entry_point_of(args.arch)
    if named:
        trust_entry_point(named)  # named on the command line: the user's own module
    # With a checkpoint, an entry point only allows the import: the checkpoint's own record builds it.
    spec = create_spec_from(args.arch, **overrides)[0] if args.arch and not (named and args.checkpoint) else None
    net, ratio = None, None
    if args.checkpoint:
        model, net, ratio = _checkpoint_network(args, spec)
    else:
        model = create_model(spec)
    size = _score_input_size(args, model)
    name = model.spec.get("name") or args.arch or args.checkpoint
    if args.global_sparsity is not None:
        _prune_globally(args, model, net)
    if net is not None or args.exit_after is not None:
        return _score_with_exit(args, model, net, ratio, size, name)
    result = count(model, (3, size, size), bits=bit_widths(args, model), uniform_sparsity=args.uniform_sparsity)
    if args.json:
        out = result.summary()
        out["arch"] = name
        if args.layers:
            out["layers"] = result.layer_table()
            out["blocks"] = [{"name": b.name, "mults": b.mults, "adds": b.adds, "ops": b.ops}
                             for b in result.blocks]
        print(json.dumps(out, indent=2, default=list))
    else:
        print(format_report(result, name, args.layers))
    return 0


def _prune_globally(args, model, exit_net) -> None:
    """``--global-sparsity S``: the pruning stage's criterion (one global threshold on each layer's
    |w| over its L2 norm, weights already zero first) applied to ``model`` in place."""
    s = args.global_sparsity
    clash = [flag for flag, on in (("--uniform-sparsity", args.uniform_sparsity is not None),
                                   ("--exit-after", args.exit_after is not None),
                                   ("a checkpoint with an exit", exit_net is not None),
                                   ("a quantized checkpoint", hasattr(args, "checkpoint_quant"))) if on]
    if clash:
        raise SipaError(f"sipa score: --global-sparsity prunes a plain network; not with {clash[0]}")
    if not 0 <= s < 1:
        raise SipaError(f"sipa score: --global-sparsity must be in [0, 1), got {s}")
    apply_masks(model, magnitude_masks(model, masks_from_zeros(model), s, scope="global", normalize="l2"))


def _counted_at_own_widths(args, record) -> None:
    """A quantized checkpoint is counted at the widths it was trained at, on its quantized
    values (the float twin); width options would contradict it."""
    given = [flag for flag, on in (("--bits", args.bits != 16), ("--weight-bits", args.weight_bits is not None),
                                   ("--act-bits", args.act_bits is not None), ("--add-bits", args.add_bits != 32),
                                   ("--layer-bits", bool(args.layer_bits))) if on]
    if given:
        raise SipaError(f"sipa score: {args.checkpoint} is quantized ({record.label}) and is counted at its "
                        f"own widths; drop {given[0]}")
    args.checkpoint_widths = record.widths
    args.checkpoint_quant = record


def _score_with_exit(args, model, net, ratio, size, name) -> int:
    """A network with an early exit: parameters of both, expected ops at the exit ratio.
    ``--uniform-sparsity`` applies to the main network (the exit is counted as it is)."""
    quant = getattr(args, "checkpoint_quant", None)
    if net is not None and args.exit_after is None:
        ratio = ratio if args.exit_ratio is None else args.exit_ratio
    else:
        net = EarlyExitNetwork(model, exit_config(model, args.exit_after, args.exit_width))
        ratio = 0.0 if args.exit_ratio is None else args.exit_ratio
    if not 0 <= ratio <= 1:
        raise SipaError(f"sipa score: --exit-ratio must be in [0, 1], got {ratio}")
    widths = bit_widths(args, model)
    cost = exit_cost(net, (3, size, size), bits=widths, main_uniform_sparsity=args.uniform_sparsity,
                     exit_bits=quant.exit_widths if quant else None)
    s = cost.summary(ratio)
    s.update(arch=name, exit_position=net.position, exit_bytes=cost.exit_bytes, exit_ops=cost.exit_ops,
             path_ops=cost.path_ops, full_ops=cost.full_ops)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print("\n".join([
        f"model           {name} + exit after block {net.position} (input {size}x{size}, {cost.widths.label()})",
        f"parameters      {s['params_mb']:.6f} MB "
        f"(main {cost.main_bytes / 1e6:.6f} + exit {cost.exit_bytes / 1e6:.6f})",
        f"math ops        {_fmt(s['ops'])} expected at exit ratio {ratio:.4f} (path {_fmt(cost.path_ops)} + exit "
        f"{_fmt(cost.exit_ops)}; full {_fmt(cost.full_ops)})",
        f"params score    {s['params_score']:.6f}",
        f"ops score       {s['ops_score']:.6f}",
        f"score           {s['score']:.6f}   (WideResNet-28-10 = 2.0: 1.0 + 1.0)",
        f"adder tree      ops {_fmt(s['ops_tree'])}, ops score {s['ops_score_tree']:.6f}, score {s['score_tree']:.6f}"
        f"   (the 2019 entries' accounting of a layer's accumulation)"]))
    return 0


def cmd_check_params(args) -> int:
    sections = check_params(args.file)
    print(f"{args.file}: {', '.join(sections)} ok")
    for line in inactive_keys(args.file):
        print(f"inactive: {line}")
    if args.resolved:
        print(yaml.safe_dump(resolved_trainings(args.file), sort_keys=False, width=110).rstrip())
    return 0


def cmd_archs(args) -> int:
    for name in sorted(ARCHITECTURES):
        spec = create_spec(name)
        extra = ", ".join(f"{k}={spec[k]}" for k in ("width", "depth", "resolution", "widen") if k in spec)
        print(f"{name:<18} {spec['family']:<13} {extra}")
    print("also: torchvision:<name> (torchvision.models.list_models()), timm:<name> (timm installed), "
          "networks/<file>.py:<function> (docs/networks.md)")
    return 0


def cmd_plan(args) -> int:
    """Every training a params file will run, with the images it processes and an estimated time."""
    if args.throughput is not None and args.throughput <= 0:
        raise SipaError(f"sipa plan: --throughput must be a positive number of images/s, got {args.throughput}")
    sizes, rows = plan(args.file)
    throughput, note = args.throughput, ""
    if throughput is None and args.measure:
        throughput = measure_throughput(args.file)
        note = " (measured here: the improving stage's base recipe, 5 timed steps)"
    if args.json:
        print(json.dumps({"data": sizes, "trainings": rows, "throughput": throughput,
                          "total_images": sum(r["images"] for r in rows),
                          "estimated_seconds": sum(r["images"] for r in rows) / throughput if throughput else None},
                         indent=2))
    else:
        print(format_plan(sizes, rows, throughput, note))
    return 0


def cmd_config_reference(args) -> int:
    """The configuration reference (docs/configuration.md) from the stage schemas; with --check, whether FILE is it."""
    if args.check is None:
        sys.stdout.write(configuration_reference())
        return 0
    problem = check_file(args.check)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0
