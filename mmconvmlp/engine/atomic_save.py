"""Checkpoints that appear whole or not at all.

mmengine 0.10.7 writes a checkpoint straight under its final name, so a job killed while
saving leaves a partial file there, and ``last_checkpoint`` may then name it.
:class:`~.runner.ConvMLPRunner` writes each checkpoint under :func:`partial_name` in the
same folder and :func:`publish` renames it once it is complete and on disk; mmengine's
CheckpointHook writes ``last_checkpoint`` only after that, so it always names a complete
file. A kill leaves the previous checkpoint as the resume point, and at most a hidden
``.NAME.partial`` file, which the next save of that name replaces.
"""
import os
import os.path as osp


def partial_name(filename: str) -> str:
    """The hidden name a checkpoint has while it is being written."""
    return f'.{filename}.partial'


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
