"""Crafted checkpoints that would steer the process through numpy's and mmengine's trust in
their pickled state, built here and each loaded in a subprocess (a crash fails its test, not
the suite): refused by plain ``torch.load`` with torch's own error and with
CheckpointRefusedError by mmengine's loaders, with no class state changed. The same for the
converter's reader. Then what importing mmconvmlp changes in a process: only torch's
allow-list (by checking stand-ins) and mmengine's checkpoint loading."""
import copyreg
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')


class Reduce:
    """Pickles as the ``__reduce__`` tuple it is given: how the crafted files are written."""

    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


def empty_array():
    """What a pickled array starts as: ``_reconstruct(ndarray, (0,), b'b')``."""
    return _reconstruct, (np.ndarray, (0,), b'b')


def structured(offset):
    """A one-field structured dtype whose int64 field sits at ``offset`` of an 8-byte item."""
    return Reduce(np.dtype, ('V8', False, True),
                  (3, '|', None, ('a',), {'a': (np.dtype('<i8'), offset)}, 8, 1, 16))


def history_buffer(**state):
    """A HistoryBuffer pickled with ``state`` in place of what it holds."""
    base = dict(max_length=10, _log_history=np.array([1.0, 2.0]),
                _count_history=np.array([1, 1]),
                statistics_methods={'mean': HistoryBuffer.mean})
    buffer = HistoryBuffer()
    buffer.__reduce_ex__ = lambda protocol: (copyreg.__newobj__, (HistoryBuffer,),
                                             {**base, **state})
    return buffer


#: Each crafted value, stored as ``meta.seed`` of an otherwise normal checkpoint.
HOSTILE = {
    # numpy.ndarray(shape, dtype, buffer): elements are pointers read from the file
    'object array from raw bytes': Reduce(np.ndarray, ((4,), np.dtype('O'), b'A' * 32)),
    'ndarray called with buffer, offset, strides': Reduce(
        np.ndarray, ((4,), np.dtype('f8'), b'A' * 8, 0, (0,))),
    'object array through _reconstruct': Reduce(
        *empty_array(), (1, (4,), np.dtype('O'), False, b'A' * 32)),
    'array bytes shorter than its shape': Reduce(
        *empty_array(), (1, (1 << 20,), np.dtype('f8'), False, b'A' * 8)),
    'object scalar from raw bytes': Reduce(scalar, (np.dtype('O'), b'A' * 8)),
    # dtype.__setstate__: an object field without numpy's reference-counting flags
    'dtype flags set by its state': Reduce(
        np.dtype, ('V8', False, True), (3, '|', None, ('a',), {'a': (np.dtype('O'), 0)},
                                        8, 8, 0)),
    'number dtype given fields by its state': Reduce(
        np.dtype, ('f8', False, True), (3, '<', None, ('a',), {'a': (np.dtype('<i8'), 1 << 30)},
                                        8, 8, 0)),
    'number dtype given flags by its state': Reduce(
        np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 0x3f)),
    'field 1 GiB past its item': Reduce(*empty_array(),
                                        (1, (1,), structured(1 << 30), False, b'A' * 8)),
    'field before its item': Reduce(*empty_array(),
                                    (1, (1,), structured(-(1 << 20)), False, b'A' * 8)),
    # HistoryBuffer.__setstate__ updates the dict its whole class shares
    'HistoryBuffer rewiring every buffer': history_buffer(
        statistics_methods={'mean': HistoryBuffer.max}),
    'HistoryBuffer with other attributes': history_buffer(_statistics_methods={}),
    'HistoryBuffer logs that are no numbers': history_buffer(_log_history='AAAA'),
}

def fragment(obj) -> bytes:
    """``obj``'s protocol-2 pickle without its PROTO and STOP, to splice into another."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def meta_seed(value_ops: bytes) -> bytes:
    """A pickle of ``{'meta': {'seed': VALUE}}`` whose VALUE is built by ``value_ops``."""
    return (b'\x80\x02}X\x04\x00\x00\x00meta}X\x04\x00\x00\x00seed' + value_ops
            + pickle.SETITEM + pickle.SETITEM + pickle.STOP)


#: Crafted pickles no pickler writes: an array whose state is restored twice (the second
#: time into memory numpy already handed out), a HistoryBuffer created with arguments.
RAW_HOSTILE = {
    'array state restored twice': meta_seed(
        fragment(np.zeros(1)) + fragment((1, (4,), np.dtype('f8'), False, b'A' * 32))
        + pickle.BUILD),
    'HistoryBuffer created with arguments': meta_seed(
        b'cmmengine.logging.history_buffer\nHistoryBuffer\n' + fragment(([1.0], [1]))
        + pickle.NEWOBJ),
}

#: Loads each file every way mmengine and torch load checkpoints; prints what each did, a
#: line per file, before the next (a crash leaves the files loaded so far).
LOAD_EVERY_WAY = r'''
import json, pickle, sys
import torch
import mmconvmlp
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint
from mmconvmlp.models import ConvMLP

work_dir, paths = sys.argv[1], sys.argv[2:]
runner = Runner(model=torch.nn.Linear(1, 1), work_dir=work_dir)
for path in paths:
    done = {}
    loads = {
        'torch.load': lambda: torch.load(path),
        'load_checkpoint': lambda: load_checkpoint(torch.nn.Linear(1, 1), path),
        'Runner.resume': lambda: runner.resume(path),
        'init_cfg': ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights,
    }
    for name, load in loads.items():
        try:
            load()
            done[name] = 'loaded'
        except pickle.UnpicklingError as error:
            done[name] = [type(error).__name__, str(error)]
    buffer = HistoryBuffer([1.0, 3.0], [1, 1])
    done['class state'] = [all(method is vars(HistoryBuffer)[name]
                               for name, method in HistoryBuffer._statistics_methods.items()),
                           buffer.statistics('mean'), buffer.statistics('max')]
    print(json.dumps([path, done]), flush=True)
'''


def test_crafted_files_are_refused_every_way_without_harm(tmp_path):
    paths = {}
    for number, (name, value) in enumerate(HOSTILE.items()):
        paths[name] = str(tmp_path / f'crafted_{number}.pth')
        torch.save(dict(state_dict={'weight': torch.ones(1, 1)}, meta=dict(seed=value)),
                   paths[name])
    for number, (name, data_pkl) in enumerate(RAW_HOSTILE.items()):
        paths[name] = str(tmp_path / f'raw_{number}.pth')
        raw_checkpoint(paths[name], data_pkl)
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', LOAD_EVERY_WAY, str(tmp_path / 'work'),
                             *paths.values()], capture_output=True, text=True, timeout=600,
                            env=env, cwd=ROOT)
    found = dict(json.loads(line) for line in result.stdout.splitlines()
                 if line.startswith('["'))
    crashed = next((name for name, path in paths.items() if path not in found), None)
    assert result.returncode == 0, (crashed, result.returncode, result.stderr[-3000:])
    for name, path in paths.items():
        done = found[path]
        kind, message = done.pop('torch.load')
        assert kind == 'UnpicklingError' and message.startswith('Weights only load failed'), \
            name
        for way in ('load_checkpoint', 'Runner.resume', 'init_cfg'):
            kind, message = done[way]
            assert kind == 'CheckpointRefusedError', (name, way, message)
            assert message.startswith(f'{path} was refused: ') and 'safe loading' in message
        assert done['class state'] == [True, 2.0, 3.0], name


def test_stock_checkpoints_still_load_with_their_numbers(tmp_path):
    """What mmengine's Runner writes (message hub with HistoryBuffers, an empty one too;
    numpy numbers and arrays of both byte orders and orders in meta) loads by plain
    torch.load after import mmconvmlp, as HistoryBuffers, numpy numbers and arrays."""
    from mmengine.logging import MessageHub
    hub = MessageHub('hostile_stock')
    for loss in (0.5, 0.25):
        hub.update_scalar('train/loss', np.float64(loss))
    hub.update_scalar('train/lr', 0.1)
    state = hub.state_dict()
    state['log_scalars']['empty'] = HistoryBuffer()
    meta = dict(seed=np.int64(7), best=np.float32(0.5), flag=np.bool_(True),
                big_endian=np.arange(6, dtype='>i4').reshape(2, 3),
                fortran=np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                nothing=np.zeros((0, 4), np.uint8), kind=np.dtype('<u2'))
    path = tmp_path / 'iter_2.pth'
    torch.save(dict(meta=meta, state_dict={'w': torch.ones(2)}, message_hub=state), path)
    script = (
        'import sys, numpy as np, torch, mmconvmlp\n'
        'from mmengine.logging import HistoryBuffer\n'
        'ckpt = torch.load(sys.argv[1])\n'
        'meta, scalars = ckpt["meta"], ckpt["message_hub"]["log_scalars"]\n'
        'assert all(type(b) is HistoryBuffer for b in scalars.values())\n'
        'assert type(scalars["train/loss"]._log_history) is np.ndarray\n'
        'print(scalars["train/loss"].mean(), scalars["train/lr"].current(),'
        ' len(scalars["empty"].data[0]), type(meta["seed"]).__name__, meta["seed"],'
        ' meta["best"], meta["flag"], meta["big_endian"].tolist() == [[0, 1, 2], [3, 4, 5]],'
        ' meta["fortran"].flags.f_contiguous, meta["fortran"][1, 2], meta["nothing"].shape,'
        ' meta["kind"].dtype, isinstance(meta["fortran"], np.ndarray))\n')
    result = subprocess.run([sys.executable, '-c', script, str(path)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ['0.375', '0.1', '0', 'int64', '7', '0.5', 'True', 'True',
                                     'True', '5.0', '(0,', '4)', 'uint16', 'True']


# --------------------------------------------------------------------------------------------
# The converter's reader
# --------------------------------------------------------------------------------------------
def raw_checkpoint(path, data_pkl: bytes) -> None:
    """A file laid out as torch.save writes one (a zip archive), whose pickle is
    ``data_pkl``."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/version', '3\n')


def restores_state_into(module: str, name: str, state) -> bytes:
    """A pickle of ``{'meta': X}`` where X is the global ``module.name`` itself with
    ``state`` restored into it (pickle's BUILD), as no pickler writes one."""
    inner = pickle.dumps(state, protocol=2)[2:-1]  # without PROTO and STOP
    return (b'\x80\x02}X\x04\x00\x00\x00meta' + f'c{module}\n{name}\n'.encode() + inner
            + pickle.BUILD + pickle.SETITEM + pickle.STOP)


CONVERTER_TARGETS = {
    'torch.device': ('torch', 'device', (None, {'type': 'evil'})),
    'a function torch allows': ('torch.serialization', '_get_layout',
                                (None, {'__name__': 'rewired', '__defaults__': (1,)})),
    'torch.nn.Parameter': ('torch.nn.parameter', 'Parameter', (None, {'__repr__': 'x'})),
}

CONVERT = r'''
import sys, torch
from mmconvmlp.checkpoints import load_checkpoint_safely
from mmconvmlp.engine import CheckpointRefusedError
for path in sys.argv[1:]:
    try:
        load_checkpoint_safely(path)
        print('loaded')
    except CheckpointRefusedError as error:
        print(error)
print(torch.serialization._get_layout.__name__, torch.serialization._get_layout.__defaults__,
      torch.device('cpu').type, type(torch.nn.Parameter.__repr__).__name__)
'''


def test_converter_restores_state_only_into_what_it_creates(tmp_path):
    """A pickle that restores state into a class or function (BUILD), which the converter's
    reader would have set attributes on: refused, by torch.load too, and nothing changed."""
    paths = []
    for number, (module, name, state) in enumerate(CONVERTER_TARGETS.values()):
        paths.append(tmp_path / f'crafted_{number}.pth')
        raw_checkpoint(paths[-1], restores_state_into(module, name, state))
        with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
            torch.load(paths[-1])
    result = subprocess.run([sys.executable, '-c', CONVERT, *map(str, paths)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    *refusals, unchanged = result.stdout.strip().splitlines()[-len(paths) - 1:]
    for path, (_, name, _), refusal in zip(paths, CONVERTER_TARGETS.values(), refusals):
        assert refusal.startswith(f'{path} was refused: the pickle restores state into {name}')
    assert unchanged == '_get_layout None cpu function'


# --------------------------------------------------------------------------------------------
# The tools, end to end
# --------------------------------------------------------------------------------------------
def test_tools_refuse_an_object_array_in_meta_with_one_line(tmp_path):
    """The files that ended tools/train.py --resume and tools/infer.py with a segmentation
    fault: an object array from raw bytes as meta.seed and as the classes; tools/test.py
    too."""
    from mmconvmlp.datasets import write_shapes_dataset
    write_shapes_dataset(str(tmp_path / 'data' / 'shapes'), num_train=2, num_val=1,
                         image_size=64, seed=0)
    pointers = Reduce(np.ndarray, ((4,), np.dtype('O'), b'A' * 32))
    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(state_dict={}, meta=dict(seed=pointers, dataset_meta=dict(
        classes=pointers))), path)
    image = sorted((tmp_path / 'data/shapes/coco/val2017').iterdir())[0]
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    for command in (['train.py', RETINANET, '--resume', str(path), '--work-dir',
                     str(tmp_path / 'work'), '--cfg-options', 'train_dataloader.num_workers=0',
                     'train_dataloader.persistent_workers=False'],
                    ['test.py', RETINANET, str(path), '--work-dir', str(tmp_path / 'test'),
                     '--cfg-options', 'test_dataloader.num_workers=0',
                     'test_dataloader.persistent_workers=False'],
                    ['infer.py', RETINANET, str(path), str(image), '--out-dir',
                     str(tmp_path / 'out')]):
        result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', command[0]),
                                 *command[1:]], capture_output=True, text=True, timeout=300,
                                env=env, cwd=tmp_path)
        assert result.returncode == 1, (command[0], result.returncode, result.stderr[-3000:])
        assert 'Traceback' not in result.stderr, result.stderr[-3000:]
        assert f"{path} was refused: it holds what safe loading refuses: numpy dtype 'O8'" \
            in result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# What importing mmconvmlp changes
# --------------------------------------------------------------------------------------------
IMPORT_SIDE_EFFECTS = r'''
import importlib, json, pickle, socket, sys
import torch
from mmengine.runner import load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

hook, timeout = sys.excepthook, socket.getdefaulttimeout()
schemes = dict(CheckpointLoader._schemes)
before = torch.serialization.get_safe_globals()
import mmconvmlp
from mmconvmlp.engine import safe_loading
importlib.reload(safe_loading)
safe_loading.allow_mmengine_checkpoints()
added = [entry for entry in torch.serialization.get_safe_globals() if entry not in before]
ours = [entry for entry in added if not getattr(entry, '__module__', '').startswith('torch.')]

def refusing(filename, map_location=None):
    raise pickle.UnpicklingError('Unsupported global: GLOBAL os.system was not allowed')

CheckpointLoader.register_scheme('later://', refusing)
try:
    load_checkpoint(torch.nn.Linear(1, 1), 'later://x')
    later = 'loaded'
except safe_loading.CheckpointRefusedError as error:  # the reloaded module's class
    later = str(error)
wrapper = CheckpointLoader.load_checkpoint.__func__
print(json.dumps(dict(
    excepthook=sys.excepthook is hook, timeout=socket.getdefaulttimeout() == timeout,
    schemes=all(CheckpointLoader._schemes[p] is f for p, f in schemes.items()),
    ours=sorted(name for _, name in ours),
    stand_ins=all(type(e) is tuple and e[0].__module__ == safe_loading.__name__ for e in ours)
    and all(e[0] is getattr(safe_loading, e[0].__name__) for e in ours),
    wrapped_once=not hasattr(wrapper.mmconvmlp_wraps, 'mmconvmlp_wraps'), later=later)))
'''


def test_import_changes_only_the_allow_list_and_checkpoint_loading():
    result = subprocess.run([sys.executable, '-c', IMPORT_SIDE_EFFECTS], capture_output=True,
                            text=True, timeout=300, cwd=ROOT,
                            env=dict(os.environ, MMCONVMLP_DOWNLOAD_TIMEOUT='5'))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found.pop('ours') == sorted([
        'numpy.dtype', 'numpy.ndarray', 'mmengine.logging.history_buffer.HistoryBuffer',
        'builtins.getattr', 'builtins.bytes', 'numpy._core.multiarray._reconstruct',
        'numpy.core.multiarray._reconstruct', 'numpy._core.multiarray.scalar',
        'numpy.core.multiarray.scalar'])
    assert found.pop('later').startswith('later://x was refused: loading it would run code '
                                         '(it asks to import and call os.system)')
    assert found == dict(excepthook=True, timeout=True, schemes=True, stand_ins=True,
                         wrapped_once=True)
