"""Fault injection for the reliability tests: kill the process at a named point.

``SIPA_FAULT=point:n`` makes the n-th arrival at ``fault_point(point)`` send
SIGKILL to this process (no cleanup, no atexit: what a preempted machine
does). Points: ``step`` (after an optimizer step, mid-epoch), ``epoch``
(after an epoch's state is saved), ``write`` (a file written to its temporary
name, before the rename), ``trial`` (after a search trial is stored),
``round`` (after a pruning round is kept), ``exit`` (after an exit is
trained and kept), ``publish`` (a stage's outputs written, its metrics not yet). ``point:n@r``
kills only the data-parallel process of global rank r (``RANK``). Unset, a
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("SIPA_FAULT", "")
_TARGET: tuple[str, int] | None = None
_SPEC, _, _RANK = _SPEC.partition("@")
if _SPEC and (not _RANK or int(_RANK) == int(os.environ.get("RANK", "0"))):
    name, _, n = _SPEC.partition(":")
    _TARGET = (name, int(n or 1))
_SEEN: dict[str, int] = {}


def fault_point(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
