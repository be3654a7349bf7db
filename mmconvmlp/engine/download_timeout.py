"""Checkpoint downloads that give up on a silent server.

mmengine downloads ``http(s)://`` checkpoints (``init_cfg``, ``load_from``, test.py's
checkpoint, ``open-mmlab://`` and the other model-zoo schemes) through torch.hub's
``download_url_to_file``, which opens the URL without a timeout: a server that accepts the
connection and never answers hangs the run for ever. :func:`add_download_timeout` makes
every loader registered with mmengine's ``CheckpointLoader`` open its sockets with a
timeout (``MMCONVMLP_DOWNLOAD_TIMEOUT`` seconds between two answers of the server, 60 by
default) and turns a timeout into :class:`CheckpointDownloadError`. torch.hub writes the
download under a temporary name and removes it on an error, so nothing partial is left in
the cache. Called when mmconvmlp.engine is imported.
"""
import functools
import os
import socket
import urllib.error
from typing import Callable

from mmengine.runner.checkpoint import CheckpointLoader

from .readable_errors import ReadableError

DEFAULT_TIMEOUT_S = 60.0


class CheckpointDownloadError(ReadableError, TimeoutError):
    """A checkpoint URL whose server stopped answering."""


def download_timeout() -> float:
    """Seconds a download waits for the server: ``MMCONVMLP_DOWNLOAD_TIMEOUT`` or 60."""
    value = os.environ.get('MMCONVMLP_DOWNLOAD_TIMEOUT', '')
    try:
        return float(value) if float(value) > 0 else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _is_timeout(error: Exception) -> bool:
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, Exception) else error
    return isinstance(error, (socket.timeout, TimeoutError))


def _with_timeout(loader: Callable) -> Callable:
    @functools.wraps(loader)  # keeps __name__: mmengine logs it
    def load(filename, *args, **kwargs):
        timeout = download_timeout()
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            return loader(filename, *args, **kwargs)
        except Exception as error:
            if not _is_timeout(error):
                raise
            raise CheckpointDownloadError(
                f'{filename}: the server sent nothing for {timeout:g} s, so the download was '
                'given up (nothing was left in the cache). Check the URL and the network and '
                'try again (MMCONVMLP_DOWNLOAD_TIMEOUT sets the seconds to wait), or download '
                'the file yourself and give its path instead.') from None
        finally:
            socket.setdefaulttimeout(previous)
    load.has_download_timeout = True
    return load


def add_download_timeout() -> None:
    """Give every registered checkpoint loader the download timeout (see the module)."""
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, 'has_download_timeout', False):
            CheckpointLoader.register_scheme(prefix, _with_timeout(loader), force=True)
