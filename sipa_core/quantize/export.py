"""A quantized network exported to ONNX and run with onnxruntime: Brevitas' QCDQ
export (weights as int8 constants, biases as constants), then rewritten so that
every quantized conv and linear layer runs as an integer kernel. A network
trained with output quantizers becomes the QDQ graph onnxruntime fuses into
``QLinearConv`` / ``QGemm`` (``onnx_qdq.py``: integer biases, uint8
activations); one without them gets ``ConvInteger`` / ``MatMulInteger`` on the
integer input and weights, the int32 accumulator scaled back per output channel
and the bias added in float (``onnx_integer.py``). What is not quantized
(activation functions, SE gate, pooling, residual additions) runs in float.

A network with an exit is exported as two graphs, so that adaptive inference
really skips work: ``path`` (input -> exit logits and the features at the
exit) and ``rest`` (those features -> the main network's logits), run only for
the images whose exit confidence is not above the threshold.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sipa_core.io import atomic_write_bytes
from sipa_core.latency import integer_share, kernel_macs
from sipa_core.quantize.onnx_integer import (FLOAT_KERNELS, INTEGER_KERNELS, integer_kernel_counts, rewrite_integer,
                                             session_and_warnings)
from sipa_core.quantize.onnx_qdq import has_output_quantizers, rewrite_qdq
from sipa_core.quantize.qat import quantized_layer_count
from sipa_core.train.evaluation import accuracy, normalized

OPSET = 17


class ExitPath(nn.Module):
    """Input -> (exit logits, features at the exit)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net.features(x)
        return self.net.exit(h), h


class Rest(nn.Module):
    """Features at the exit -> the main network's logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, h):
        return self.net.rest(h)


def _export(module: nn.Module, example: torch.Tensor, path: Path, names: tuple[list, list]) -> Path:
    """QCDQ export with weights and biases as initializers (Brevitas otherwise keeps them as graph
    inputs: onnxruntime warns for each and cannot fold them), then the integer rewrite (the QDQ form
    where every layer's output is quantized, else integer kernels with float arithmetic around)."""
    from brevitas.export import export_onnx_qcdq  # noqa: PLC0415 (heavy, export only)

    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx_qcdq(module.eval(), args=example, export_path=str(path), opset_version=OPSET, dynamo=False,
                     input_names=names[0], output_names=names[1], keep_initializers_as_inputs=False,
                     do_constant_folding=True, dynamic_axes={n: {0: "batch"} for n in names[0] + names[1]})
    graph = onnx.load(str(path))
    graph, _ = rewrite_qdq(graph) if has_output_quantizers(graph) else rewrite_integer(graph)
    onnx.save(graph, str(path))
    return path


def _export_float(module: nn.Module, example: torch.Tensor, path: Path, names: tuple[list, list]) -> Path:
    """A floating-point network as it is (the graph its latency is measured on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module.eval(), (example,), str(path), opset_version=OPSET, dynamo=False,
                      input_names=names[0], output_names=names[1], do_constant_folding=True,
                      dynamic_axes={n: {0: "batch"} for n in names[0] + names[1]})
    return path


@torch.no_grad()
def export_network(main: nn.Module, net, input_shape, folder: Path, quantized: bool = True) -> dict[str, Path]:
    """ONNX files of the network (quantized: the integer graph; else the float network as it is):
    ``full`` always; ``path`` and ``rest`` with an exit."""
    folder, write = Path(folder), _export if quantized else _export_float
    x = torch.zeros(1, *input_shape)
    files = {"full": write(main, x, folder / "full.onnx", (["image"], ["logits"]))}
    if net is not None:
        files["path"] = write(ExitPath(net), x, folder / "path.onnx", (["image"], ["exit_logits", "features"]))
        h = net.features(x)
        files["rest"] = write(Rest(net), h, folder / "rest.onnx", (["features"], ["logits"]))
    return files


def _session(path: Path, threads: int | None = None):
    session, warnings = session_and_warnings(path, threads)
    for line in warnings:  # none expected: shown, not hidden
        print(line, file=sys.stderr)
    return session


@dataclass
class OnnxNetwork:
    """onnxruntime sessions of an exported network; ``predict`` is adaptive when it has an exit."""

    full: object
    path: object | None = None
    rest: object | None = None
    threshold: float | None = None

    @classmethod
    def load(cls, files: dict, threshold: float | None = None, threads: int | None = None) -> OnnxNetwork:
        if "path" in files and threshold is not None:
            return cls(_session(files["full"], threads), _session(files["path"], threads),
                       _session(files["rest"], threads), threshold)
        return cls(_session(files["full"], threads))

    def logits(self, x: np.ndarray, adaptive: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(logits used per image, mask of the images that left at the exit)."""
        if not adaptive or self.path is None:
            return self.full.run(None, {"image": x})[0], np.zeros(len(x), dtype=bool)
        exit_logits, h = self.path.run(None, {"image": x})
        z = exit_logits - exit_logits.max(1, keepdims=True)
        conf = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).max(1)
        exited = conf > self.threshold
        out = exit_logits.copy()
        stay = np.flatnonzero(~exited)
        if len(stay):
            out[stay] = self.rest.run(None, {"features": h[stay]})[0]
        return out, exited


def onnx_predictions(model: OnnxNetwork, x_uint8: torch.Tensor, mean, std, batch_size: int = 500,
                     adaptive: bool = True) -> torch.Tensor:
    """Predicted classes of a uint8 image tensor, by onnxruntime."""
    preds = []
    for i in range(0, len(x_uint8), batch_size):
        x = normalized(x_uint8[i:i + batch_size], mean, std).numpy()
        preds.append(torch.from_numpy(model.logits(x, adaptive)[0].argmax(1)))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def export_and_check(main: nn.Module, net, threshold: float | None, data, test_predictions: torch.Tensor,
                     folder: Path) -> tuple[dict[str, bytes], dict]:
    """Export the network to ONNX in ``folder`` and run the test split with onnxruntime (adaptively at
    ``threshold`` with an exit): (the files' bytes by name, metrics: accuracy, agreement with the
    PyTorch predictions, the kernels onnxruntime runs the layers with after its optimisations, and
    the share of the multiply-adds those integer kernels run)."""
    h = data.image_size[0]
    files = export_network(main, net, (3, h, h), Path(folder))
    x, y = data.split("test")
    preds = onnx_predictions(OnnxNetwork.load(files, threshold), x, data.mean, data.std)
    ops = integer_kernel_counts(files["full"])
    metrics = {"onnx_accuracy": accuracy(preds, y),
               "onnx_agreement": float((preds == test_predictions).float().mean()),
               "onnx_integer_layers": sum(ops.get(k, 0) for k in INTEGER_KERNELS),
               "onnx_float_layers": sum(ops.get(k, 0) for k in FLOAT_KERNELS),
               "onnx_integer_mac_share": integer_share(kernel_macs(files["full"])),
               "quantized_layers": quantized_layer_count(main)}
    return {f"{name}.onnx": path.read_bytes() for name, path in files.items()}, metrics


def write_onnx(folder: Path, files: dict[str, bytes]) -> None:
    """The exported files, each written atomically (inside the stage's publishing block)."""
    for name, data in files.items():
        atomic_write_bytes(Path(folder) / name, data)


def drop_stale_onnx(folder: Path, files: dict[str, bytes]) -> None:
    """Files of an earlier run that this one did not write (an exit's graphs after a run without one)."""
    for old in Path(folder).glob("*.onnx"):
        if old.name not in files:
            old.unlink()
