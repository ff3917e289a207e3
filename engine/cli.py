"""What every command-line entry point shares: user errors as one line, clean shutdown."""
from __future__ import annotations

import os
import sys
from typing import Callable

from data import BadImageError

from .checkpoint import CheckpointError
from .config import ConfigError

__all__ = ["USER_ERRORS", "run_cli"]

#: Errors caused by the input (a file, a key, the data) or the machine (a full disk, a
#: missing permission: OSError names the file): reported in one line, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, BadImageError, OSError, ValueError)


def run_cli(main: Callable[[], object], extra_errors: tuple = ()) -> int:
    """Run ``main``; an input error prints ``error: ...`` and returns 1 (``SN_TRACEBACK=1``
    re-raises it); the process group, if any, is destroyed in all cases. Returns main's
    int result, or 0."""
    from .distributed import cleanup
    try:
        result = main()
    except USER_ERRORS + tuple(extra_errors) as e:
        if os.environ.get("SN_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return result if isinstance(result, int) else 0
