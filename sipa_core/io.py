"""Atomic file writes and safe checkpoint loading.

Every file a stage writes goes to a temporary file in the same folder and is
renamed into place, so no reader ever sees half a file and a failed write
leaves the previous version intact.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from sipa_core.distributed import is_main_process
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> Path:
    """Write to a temporary file in the same folder, fsync, rename into place:
    a reader never sees a half-written file. Under data-parallel training only
    rank 0 writes (the other processes hold the same values)."""
    path = Path(path)
    if not is_main_process():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise SipaError(f"{path}: could not write ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("write")
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; outputs are ordinary files
        if _STAGED is not None:
            _STAGED.append((tmp, path))  # renamed when the publishing block ends
            return path
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):  # a full disk, a file-size limit, a read-only folder
            raise SipaError(f"{path}: could not write ({err.strerror or err}); the previous version, "
                            f"if any, is unchanged") from None
        raise
    return path


_STAGED: list[tuple[str, Path]] | None = None  # inside `publishing`: renames waiting for the block's end


@contextmanager
def publishing(metrics_path):
    """Write a stage's final outputs (checkpoint, tables) as one step.

    Inside the block every atomic write stops at its fsynced temporary file.
    If the block fails (a full disk), the temporary files are removed and the
    earlier outputs and metrics stay as they were. If it succeeds, the earlier
    metrics file is removed, then the outputs are renamed into place; the
    caller writes the new metrics last (``publish_metrics``). A kill in between
    leaves outputs without metrics, never outputs beside metrics that
    describe others.
    """
    global _STAGED
    _STAGED = []
    try:
        yield
    except BaseException:
        for tmp, _ in _STAGED:
            Path(tmp).unlink(missing_ok=True)
        _STAGED = None
        raise
    staged, _STAGED = _STAGED, None
    if is_main_process():
        Path(metrics_path).unlink(missing_ok=True)
        for tmp, path in staged:
            os.replace(tmp, path)


# Provenance, and the counter's breakdown of params/ops (bytes, MB, mults, adds): run information.
RUN_INFO_KEYS = frozenset({"seed", "device", "processes", "torch", "python", "params_bytes", "params_mb", "mults",
                           "adds", "train_epochs"})


def split_metrics(values: dict) -> tuple[dict, dict]:
    """(metrics, run information): numbers, flags and nulls are metrics (what
    `dvc exp show` and `dvc metrics diff` compare); names, tables, provenance
    (seed, device, library versions) and the counter's breakdown are run information."""
    def is_metric(key, value):
        return key not in RUN_INFO_KEYS and (value is None or isinstance(value, (bool, int, float)))

    metrics = {k: v for k, v in values.items() if is_metric(k, v)}
    return metrics, {k: v for k, v in values.items() if k not in metrics}


def publish_metrics(path, values: dict, info_path=None) -> Path:
    """The last writes of a stage, after every other output: its run information
    (``info_path``), then its metrics (``path``). Without ``info_path`` every value
    goes to ``path``."""
    metrics, info = split_metrics(values) if info_path is not None else (values, {})
    if info_path is not None:
        atomic_write_json(info_path, info)
    fault_point("publish")
    return atomic_write_json(path, metrics)


def atomic_write_text(path, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text), "w")


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path, rows: list[dict], columns: list[str]) -> Path:
    """A CSV table (floats to 6 significant digits), written atomically."""
    def fmt(v):
        return f"{v:.6g}" if isinstance(v, float) else "" if v is None else str(v)

    lines = [",".join(columns)] + [",".join(fmt(r.get(c)) for c in columns) for r in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def atomic_write_bytes(path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data), "wb")


def atomic_torch_save(path, obj) -> Path:
    return _atomic(path, lambda fh: torch.save(obj, fh), "wb")


def load_checkpoint(path, what: str = "checkpoint") -> Any:
    """Load a torch file with ``weights_only=True``; any failure is a SipaError.

    Files that carry pickled code (anything but tensors, numbers, strings and
    containers of them) are refused by torch's weights-only unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise SipaError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds pickled code or objects that are not plain tensors, refused for safety"
        else:
            reason = f"it is truncated, corrupt or not a torch file ({first[:160]})"
        raise SipaError(f"{path}: cannot read {what}: {reason}") from None
