"""The shared entry point of the stage scripts in ``stages/``.

Each stage script names its ``Stage`` (``sipa_core.<stage>.STAGE``: how to
read its params section, what to run, the one-line summary) and calls
``stage_main``. Bad input becomes one line on stderr and exit status 2
(``exits_cleanly``). A script imports only its own stage's modules, so the
deps DVC tracks for it are exactly the code it runs (``tests/test_dvc_deps.py``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sipa_core.distributed import init_from_env, is_main_process
from sipa_core.errors import exits_cleanly
from sipa_core.launch import check_world, launch, nodes_from_env, read_distributed, under_launcher
from sipa_core.entry_points import trust_named_entry_points

ROOT = Path(__file__).resolve().parents[1]  # this checkout (the stage scripts put it first on sys.path)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as its script and ``sipa check-params`` see it: how to
    read and check its params section, what to run, and its one-line summary."""

    name: str
    doc: str
    read_config: Callable[[str], dict]
    run: Callable[..., dict]
    summary: Callable[[dict, dict], str]
    inactive: Callable[[dict, dict], list[str]] | None = None  # (config, section as written) -> unused keys
    trains: bool = True  # runs on distributed.processes processes (sipa_core/launch.py)


def stage_main(stage: Stage, argv: list[str] | None = None) -> None:
    @exits_cleanly
    def main() -> None:
        parser = argparse.ArgumentParser(description=stage.doc.strip().splitlines()[0])
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        args = parser.parse_args(argv)
        cfg = stage.read_config(args.params)  # checked before joining a process group: bad input fails fast
        trust_named_entry_points(args.params)  # the user's network module, where the params name one
        if stage.trains and _launched(stage, args.params):
            return
        init_from_env()  # under torchrun: data-parallel training, rank 0 writes
        metrics = stage.run(cfg, params_file=args.params)
        if is_main_process():
            print(stage.summary(cfg, metrics))

    main()


def _launched(stage: Stage, params: str) -> bool:
    """Start the stage's processes when ``distributed.processes`` asks for several (True: they
    ran, and this process only launched them); under a launcher, check the world it made."""
    processes = read_distributed(params)["processes"]
    if under_launcher():
        check_world(processes)
        return False
    nodes = nodes_from_env()
    if processes == 1 and nodes.count == 1:
        return False
    status = launch(stage.name, processes, nodes, str(ROOT / "stages" / f"{stage.name}.py"), ["--params", params])
    if status:
        sys.exit(status)
    return True
