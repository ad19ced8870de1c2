"""How many processes a training stage runs on, and starting them.

``distributed.processes`` in params.yaml is the number of data-parallel
training processes (one per device) of every training stage. It changes
results (BatchNorm statistics are per process: N processes train like one
with ghost BatchNorm of batch_size / N; dropout masks are drawn per process),
so it is a DVC param of the training stages and of no other: changing it
re-runs search, improve, prune, accelerate and quantize, and neither prepare
nor report.

Which machines the processes run on is speed only (the same global ranks,
the same batches, the same averaged gradients), so it comes from the
environment and never invalidates DVC's cache: ``SIPA_NNODES`` (default 1),
``SIPA_NODE_RANK`` (0 on the node where DVC runs: global rank 0 writes the
outputs there), ``SIPA_MASTER_ADDR`` and ``SIPA_MASTER_PORT`` (that node's
address, reachable from the others).

The processes are started by PyTorch's elastic launcher (``torch.distributed.run``,
what ``torchrun`` runs), from inside the stage script itself: ``dvc.yaml`` keeps
``python stages/<stage>.py``. When one process dies the launcher stops the others
and the stage exits with one line saying so; run it again and every process
resumes from the state of the last finished epoch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sipa_core.errors import SipaError
from sipa_core.paths import read_params
from sipa_core.params import Field, check_section

DISTRIBUTED_SCHEMA = {
    "processes": Field(int, 1, min=1, help="data-parallel training processes of every training stage, one per "
                                           "device (changes results: BatchNorm statistics per process)"),
}


def read_distributed(params_path: str | Path) -> dict:
    """The ``distributed`` section of a params file, checked (absent: one process)."""
    return check_section(read_params(params_path).get("distributed"), DISTRIBUTED_SCHEMA, file=params_path,
                         section="distributed")


@dataclass(frozen=True)
class Nodes:
    """The machines a stage's processes run on (environment: speed only, not a DVC param)."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _env_int(env, name: str, default: int, low: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < low:
        raise SipaError(f"environment {name}: expected an integer >= {low}, got {raw!r}")
    return int(raw)


def nodes_from_env(env=os.environ) -> Nodes:
    count = _env_int(env, "SIPA_NNODES", 1, 1)
    rank = _env_int(env, "SIPA_NODE_RANK", 0, 0)
    if rank >= count:
        raise SipaError(f"environment SIPA_NODE_RANK: {rank} is not below SIPA_NNODES ({count})")
    if count > 1 and not env.get("SIPA_MASTER_ADDR"):
        raise SipaError("environment SIPA_MASTER_ADDR: several nodes (SIPA_NNODES) need the address of node 0")
    return Nodes(count, rank, env.get("SIPA_MASTER_ADDR") or "127.0.0.1",
                 _env_int(env, "SIPA_MASTER_PORT", 29500, 1))


def launcher_args(processes: int, nodes: Nodes, script: str, script_args: list[str]) -> list[str]:
    """``torch.distributed.run`` arguments: one node standalone, several with a static rendezvous
    (node ranks fixed, so global rank 0 is on node 0, where DVC runs)."""
    if processes % nodes.count:
        raise SipaError(f"distributed.processes: {processes} processes cannot be split evenly over "
                        f"{nodes.count} nodes (SIPA_NNODES)")
    per_node = ["--nproc-per-node", str(processes // nodes.count)]
    if nodes.count == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(nodes.count), "--node-rank", str(nodes.rank), "--master-addr", nodes.master_addr,
                 "--master-port", str(nodes.master_port)]
    return where + per_node + [script, *script_args]


def under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_world(processes: int) -> None:
    """Under a launcher (``torchrun`` by hand, or this module): the world must be what the params say."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != processes:
        raise SipaError(f"distributed.processes: {processes}, but {world} processes were started (torchrun "
                        f"by hand?): set distributed.processes: {world}, it is a DVC param (results depend on it)")


def launch(stage: str, processes: int, nodes: Nodes, script: str, script_args: list[str]) -> int:
    """Run ``script`` on ``processes`` processes with PyTorch's elastic launcher; the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415 (torch)
    from torch.distributed.run import get_args_parser, run  # noqa: PLC0415

    args = get_args_parser().parse_args(launcher_args(processes, nodes, script, script_args))
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # bad input: the process said why, in one line
            return 2
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"{stage}: training process {rank} of {processes} stopped ({how}); the launcher stopped the "
              f"others. Run the stage again: it resumes after the last finished epoch.", file=sys.stderr)
        return 1
    return 0
