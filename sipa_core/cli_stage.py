"""The shared entry point of the stage scripts in ``stages/``.

Each stage script is three lines of configuration: how to read its params
section, what to run, and the one-line summary to print. Bad input becomes one
line on stderr and exit status 2 (``exits_cleanly``).
"""

from __future__ import annotations

import argparse
from typing import Callable

from sipa_core.errors import exits_cleanly


def stage_main(description: str, read_config: Callable[[str], dict], run: Callable[..., dict],
               summarize: Callable[[dict, dict], str], argv: list[str] | None = None) -> None:
    @exits_cleanly
    def main() -> None:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        args = parser.parse_args(argv)
        cfg = read_config(args.params)  # checked before joining a process group: bad input fails fast
        from sipa_core.distributed import init_from_env, is_main_process

        init_from_env()  # under torchrun: data-parallel training, rank 0 writes
        metrics = run(cfg, params_file=args.params)
        if is_main_process():
            print(summarize(cfg, metrics))

    main()
