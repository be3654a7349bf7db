"""Errors whose message says all a user needs: what was wrong and what to do.

Uncaught in a script, such an error prints its message alone, without a traceback; the
script exits with status 1 as usual. Every other exception prints as Python prints it. The
hook that does this (:func:`install_excepthook`) is installed by the tools here when they
start and by :class:`~.runner.ConvMLPRunner` when it is built (so mmdet's and mmseg's own
``tools/train.py`` and ``tools/test.py`` with our configs print them so too), never by
importing mmconvmlp.
"""
import sys


class ReadableError(Exception):
    """Mixed into the error classes of mmconvmlp's runtime checks (missing data, refused or
    unreadable checkpoints): their message names the file and what to do about it."""


class UsageError(ReadableError):
    """A problem with a tool's command line or a config: the tools print it in one line
    and exit with status 1."""


def first_line(error: Exception, limit: int = 300) -> str:
    """The first line of an error's message, cut to ``limit`` characters (torch's
    messages can hold a whole graph on one line)."""
    line = (str(error).strip().splitlines() or [''])[0]
    return line if len(line) <= limit else line[:limit] + ' ...'


def _print_readable_errors(previous_hook):
    def hook(kind, error, traceback):
        if isinstance(error, ReadableError):
            print(f'{kind.__name__}: {error}', file=sys.stderr)
        else:
            previous_hook(kind, error, traceback)
    hook.prints_readable_errors = True
    return hook


def install_excepthook() -> None:
    """Print uncaught :class:`ReadableError` s without a traceback (once per process)."""
    if not getattr(sys.excepthook, 'prints_readable_errors', False):
        sys.excepthook = _print_readable_errors(sys.excepthook)
