"""One error type for everything a user can get wrong.

A ``SipaError`` carries a one-line message that names the file and key (or
the argument) at fault. Entry points print it without a traceback and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

USAGE_EXIT = 2


class SipaError(Exception):
    """Bad input: a wrong parameter, a missing file, an unknown name."""


def exits_cleanly(main):
    """Decorate an entry point so that a SipaError becomes one line and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SipaError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USAGE_EXIT) from None

    return wrapper
