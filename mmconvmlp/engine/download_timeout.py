"""Checkpoint downloads that give up on a silent server, each with its own timeout.

mmengine downloads ``http(s)://`` checkpoints (``init_cfg``, ``load_from``, test.py's
checkpoint), and those its model zoos name (``torchvision://``, ``open-mmlab://``,
``mmcls://``: :func:`model_zoo_url`), through torch.hub, which opens the URL without a
timeout: a server that accepts the connection and never answers hangs the run for ever.
:func:`cache_url` downloads such a file into torch.hub's cache first (where mmengine's
loader then finds it), opening the URL with a timeout of ``MMCONVMLP_DOWNLOAD_TIMEOUT``
seconds between two answers of the server (60 by default): this one request's, not the
socket module's default. The file is written
under a temporary name and renamed once complete, so a failed download leaves nothing in the
cache. A timeout, an HTTP error or an unreachable server raises
:class:`CheckpointDownloadError`. mmengine's ``CheckpointLoader`` calls it through
:mod:`.safe_loading`.
"""
import os
import os.path as osp
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import urlparse

from .readable_errors import ReadableError

VARIABLE = 'MMCONVMLP_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT_S = 60.0


class CheckpointDownloadError(ReadableError, OSError):
    """A checkpoint URL whose server stopped answering, answered with an error or could not
    be reached."""


class DownloadSettingError(ReadableError, ValueError):
    """``MMCONVMLP_DOWNLOAD_TIMEOUT`` is set to something other than a number of seconds."""


def download_timeout() -> float:
    """Seconds a download waits for the server: ``MMCONVMLP_DOWNLOAD_TIMEOUT`` or 60."""
    value = os.environ.get(VARIABLE, '').strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float('nan')
    if not 0 < seconds < float('inf'):
        raise DownloadSettingError(
            f'{VARIABLE}={value!r}: give the seconds a checkpoint download waits for the '
            f'server as a positive number (e.g. {VARIABLE}=120), or unset it for '
            f'{DEFAULT_TIMEOUT_S:g} s.')
    return seconds


def model_zoo_url(filename: str) -> Optional[str]:
    """The URL mmengine downloads ``filename`` from: itself for ``http(s)://``, the model
    zoo's entry for ``torchvision://`` / ``modelzoo://``, ``open-mmlab://`` /
    ``openmmlab://`` (deprecated names followed) and ``mmcls://``; None for anything else
    (a local file, a zoo entry that is a local path or missing, which mmengine reports)."""
    scheme, _, name = filename.partition('://')
    if scheme in ('http', 'https'):
        return filename
    from mmengine.runner import checkpoint as zoo
    if scheme in ('torchvision', 'modelzoo'):
        url = zoo.get_torchvision_models().get(name)
    elif scheme in ('open-mmlab', 'openmmlab'):
        url = zoo.get_external_models().get(zoo.get_deprecated_model_names().get(name, name))
    elif scheme == 'mmcls':
        url = zoo.get_mmcls_models().get(name)
    else:
        return None
    return url if isinstance(url, str) and url.startswith(('http://', 'https://')) else None


def cached_path(url: str) -> str:
    """Where torch.hub (and so mmengine's ``load_from_http``) keeps the file of ``url``."""
    import torch.hub
    return osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(url).path))


def _failure(url: str, error: Exception, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        what = f'the server answered {error.code} {error.reason}'
    elif isinstance(getattr(error, 'reason', None), TimeoutError) or \
            isinstance(error, TimeoutError):
        what = (f'the server sent nothing for {timeout:g} s, so the download was given up '
                f'({VARIABLE} sets the seconds to wait)')
    else:
        what = f'it could not be downloaded ({getattr(error, "reason", error)})'
    return (f'{url}: {what}; nothing was left in the cache. Check the URL and the network '
            'and try again, or download the file yourself and give its path instead.')


def cache_url(url: str) -> str:
    """The local copy of the checkpoint at ``url`` in torch.hub's cache, downloaded now
    unless it is there (see the module)."""
    path = cached_path(url)
    if osp.isfile(path) or not osp.basename(path):
        return path
    timeout = download_timeout()
    os.makedirs(osp.dirname(path), exist_ok=True)
    sys.stderr.write(f'Downloading: "{url}" to {path}\n')
    request = urllib.request.Request(url, headers={'User-Agent': 'mmconvmlp'})
    partial = tempfile.NamedTemporaryFile(dir=osp.dirname(path), prefix='.partial-',
                                          delete=False)
    try:
        with partial, urllib.request.urlopen(request, timeout=timeout) as answer:
            shutil.copyfileobj(answer, partial, 1 << 20)
        os.replace(partial.name, path)
    except (OSError, urllib.error.URLError) as error:
        raise CheckpointDownloadError(_failure(url, error, timeout)) from None
    finally:
        if osp.exists(partial.name):
            os.remove(partial.name)
    return path
