"""One error type for bad input, and the CLI wrapper that turns it into one line.

Library code raises :class:`UserError` with a message that says what is wrong (actual and
expected values) and what to do. Console scripts wrap their ``main`` with :func:`cli_entry`:
a ``UserError`` prints ``error: <message>`` on stderr and exits with status 2, with no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (a path, a name, a file, a flag). The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script ``main``: one-line errors, exit status 2 for bad input, 130 on Ctrl-C."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenPipeError:  # `... | head`: the reader left; stop quietly, as other command-line tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        raise SystemExit(code or 0)

    return wrapper
