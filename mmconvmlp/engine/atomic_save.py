"""Checkpoints that appear whole or not at all.

mmengine 0.10.7 writes a checkpoint straight under its final name, so a job killed while
saving leaves a partial file there, and ``last_checkpoint`` may then name it.
:class:`~.runner.ConvMLPRunner` writes each checkpoint under :func:`partial_name` in the
same folder and :func:`publish` renames it once it is complete and on disk; mmengine's
CheckpointHook writes ``last_checkpoint`` only after that, so it always names a complete
file. A kill leaves the previous checkpoint as the resume point, and at most a hidden
``.NAME.partial`` file, which the next training in that work dir removes
(:mod:`.work_dir_lock`). A save that fails (a full disk) removes its partial file at once
and stops with :class:`CheckpointSaveError`, saying how much space it needed and had.
"""
import os
import os.path as osp
import shutil

from .readable_errors import ReadableError


class CheckpointSaveError(ReadableError, OSError):
    """A checkpoint could not be written (a full disk, a quota, a vanished folder)."""


def partial_name(filename: str) -> str:
    """The hidden name a checkpoint has while it is being written."""
    return f'.{filename}.partial'


def is_partial_name(filename: str) -> bool:
    return filename.startswith('.') and filename.endswith('.partial')


def publish(partial: str, final: str) -> None:
    """Make the complete file ``partial`` visible as ``final``: its data reach the disk
    before the rename, and the rename reaches the disk too, so that a crash at any moment
    leaves either no ``final`` (or the previous one) or the new file whole."""
    with open(partial, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    folder = os.open(osp.dirname(osp.abspath(final)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_text(path: str, text: str) -> None:
    """Write a small text file (``last_checkpoint``) the same whole-or-nothing way."""
    partial = osp.join(osp.dirname(path), partial_name(osp.basename(path)))
    with open(partial, 'w') as f:
        f.write(text)
    publish(partial, path)


def _readable_size(size: int) -> str:
    for unit, scale in (('GB', 1e9), ('MB', 1e6)):
        if size >= scale:
            return f'{size / scale:.1f} {unit}'
    return f'{size / 1e3:.1f} kB'


def failed_save(partial: str, final: str, error: OSError,
                needed_bytes: int) -> CheckpointSaveError:
    """Remove what a failed save left at ``partial``; the error to raise, naming the
    space the checkpoint needed (``needed_bytes``, an estimate) and the space there is."""
    try:
        os.remove(partial)
    except FileNotFoundError:
        pass
    folder = osp.dirname(osp.abspath(final))
    free = shutil.disk_usage(folder).free
    return CheckpointSaveError(
        f'Saving the checkpoint {final} failed: {error.strerror or error}. It needs about '
        f'{_readable_size(needed_bytes)}; {folder} has {_readable_size(free)} free. The partial '
        'file was removed, and the last complete checkpoint (named in last_checkpoint) '
        'is still the one to resume from: free some space, then continue with --resume.')
