"""Resumable work, one way everywhere.

A unit of long work (a search trial, an improve trial, a pruning round, an
exit training, cached logits) lives in a folder named by ``run_key`` of
everything that decides its result, and ends by writing a *kept result*. A
stage started again finds the kept result and skips the work; a result of
another format (an older version, a foreign file) is ignored and the work is
done again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from sipa_core.io import atomic_torch_save, atomic_write_json, load_checkpoint
from sipa_core.runtime import record_teacher, record_training, training_cost


def run_key(blob: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able ``blob`` (keys sorted; other objects by ``str``)."""
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """A short content hash: keys kept state to the exact input file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_kept(path: str | Path, fmt: str | None = None, *, what: str = "kept result", announce: str | None = None,
              counted: bool = True):
    """The kept result at ``path`` or None: a torch file whose ``format`` is ``fmt``,
    or (``fmt`` None) a JSON file. ``announce`` is printed to stderr when found.
    ``counted``: the result stands in for its work, so the training it cost (kept beside it)
    counts toward this stage's cost; False when it is read again after being counted."""
    path = Path(path)
    if not path.is_file():
        return None
    if fmt is None:
        value = json.loads(path.read_text())
    else:
        value = load_checkpoint(path, what)
        if not (isinstance(value, dict) and value.get("format") == fmt):
            return None
    if announce:
        print(f"{announce}: kept from {path}", file=sys.stderr)
    cost = value.get("training_cost")
    if counted and cost:
        record_training(cost["images_trained"], epochs=cost["train_epochs"])
        if cost.get("teacher_images"):
            record_teacher(cost["teacher_images"])
    return value


def keep(path: str | Path, value: dict, fmt: str | None = None, *, since: float | None = None) -> dict:
    """Write a kept result atomically (torch file tagged ``fmt``, or JSON when ``fmt`` is None).
    ``since``: the unit's start (``time.time()``); the training noted since then is kept with it."""
    if since is not None:
        value = {**value, "training_cost": training_cost(since)}
    if fmt is None:
        atomic_write_json(path, value)
        return value
    value = {"format": fmt, **value}
    atomic_torch_save(path, value)
    return value
