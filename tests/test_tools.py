"""tools/train.py, tools/test.py and tools/dist_*.sh, run as a user runs them, on the paper
configs and tiny generated data sets in the COCO and ADE20K layouts, on the CPU.

The configs are used as they are, except for the length of training and for the image
sizes (:func:`small_images`: 1333x800 resizes take half a minute per iteration on one CPU
thread): the tools run from a folder holding ``data/coco`` and
``data/ade/ADEChallengeData2016`` (the configs' relative default paths), with
``TORCH_HOME`` pointing at a hub cache that holds a made-up ImageNet checkpoint under the
released file name, so the URL in ``init_cfg`` is served from the cache instead of the
network. ``OMP_NUM_THREADS=1`` for every run: torchrun gives each of its processes one
thread, and one-process runs must compute with the same thread count to give the very
same numbers.
"""
import glob
import importlib.util
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.models import ConvMLPFeatures

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_coco.py')
MASK_RCNN = osp.join(ROOT, 'configs/detection/mask_rcnn_convmlp_s_coco.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_ade20k.py')
#: COCO names, so that the COCO configs' 80-class metainfo keeps the generated categories.
CLASSES = ('person', 'car', 'dog')
TIMEOUT = 400


def small_images(config):
    """``--cfg-options`` that shrink the configs' image sizes for a CPU: detection resizes
    to fit 128x128 instead of 1333x800; segmentation resizes to a short side of 128
    instead of 512 and crops 128x128 instead of 512x512. Nothing else changes."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    options = []
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        for i, step in enumerate(cfg[loader].dataset.pipeline):
            key = f'{loader}.dataset.pipeline.{i}'
            if step.type in ('Resize', 'RandomResize') and cfg.default_scope == 'mmdet':
                options.append(f'{key}.scale=(128,128)')
            elif step.type in ('Resize', 'RandomResize'):
                options.append(f'{key}.scale=(512,128)')
            elif step.type == 'RandomCrop':
                options.append(f'{key}.crop_size=(128,128)')
    if cfg.default_scope == 'mmseg':
        options.append('model.data_preprocessor.size=(128,128)')
    return options


def with_coco_categories(ann_dir):
    """Give the generated annotation files all 80 COCO categories, in COCO's order, as
    COCO's own files have: the evaluator maps the model's 80 labels to these."""
    from mmdet.datasets import CocoDataset
    names = CocoDataset.METAINFO['classes']
    for path in glob.glob(osp.join(ann_dir, '*.json')):
        with open(path) as f:
            coco = json.load(f)
        new_id = {c['id']: names.index(c['name']) + 1 for c in coco['categories']}
        for ann in coco['annotations']:
            ann['category_id'] = new_id[ann['category_id']]
        coco['categories'] = [dict(id=i + 1, name=name) for i, name in enumerate(names)]
        with open(path, 'w') as f:
            json.dump(coco, f)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """(folder with data/, environment for the tools)."""
    root = tmp_path_factory.mktemp('tools')
    write_shapes_dataset(str(root / 'data'), num_train=2, num_val=2, image_size=96,
                         seed=0, class_names=CLASSES)
    with_coco_categories(str(root / 'data' / 'coco' / 'annotations'))
    hub = root / 'torch' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    state = ConvMLPFeatures('s').state_dict()
    state.update({'norm.weight': torch.ones(512), 'norm.bias': torch.zeros(512),
                  'head.weight': torch.zeros(1000, 512), 'head.bias': torch.zeros(1000)})
    torch.save(state, hub / 'convmlp_s_imagenet.pth')
    env = dict(os.environ, TORCH_HOME=str(root / 'torch'), OMP_NUM_THREADS='1',
               MKL_NUM_THREADS='1', PYTHON=sys.executable, PYTHONWARNINGS='ignore')
    return root, env


def load_script(path):
    """A script of the repository as a module (``tools/test.py`` is no importable name)."""
    spec = importlib.util.spec_from_file_location(
        'script_' + osp.splitext(osp.basename(path))[0], osp.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def run(cmd, cwd, env, expect_rc=0):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    if result.returncode != expect_rc:
        raise AssertionError(f'{" ".join(map(str, cmd))} exited {result.returncode}:\n'
                             f'{result.stdout[-4000:]}\n{result.stderr[-6000:]}')
    return result


def tool(name, *args):
    return [sys.executable, osp.join(ROOT, 'tools', name), *map(str, args)]


def dist(name, *args, env):
    env = dict(env, PORT=free_port())
    return ['bash', osp.join(ROOT, 'tools', name), *map(str, args)], env


def read_metrics(work_dir):
    """The metrics of the (only) test run in ``work_dir``, from the JSON mmengine writes."""
    (path,) = [p for p in glob.glob(osp.join(work_dir, '*', '*.json'))
               if osp.basename(p)[:-5] == osp.basename(osp.dirname(p))]
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {k: v for k, v in lines[-1].items() if k not in ('time', 'data_time', 'step')}




def train_log(work_dir):
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.log')))
    return open(logs[-1]).read()


def confident_checkpoint(checkpoint, out):
    """A copy of a detector's checkpoint (all of it: an mmengine checkpoint, as training
    wrote it) whose classifier scores the three generated classes well above the test
    score threshold and the others near 0: an all but untrained model then makes many
    detections, with near-tied scores. Segmentors are left as they are."""
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=False)
    state = ckpt['state_dict']
    wanted = [0, 2, 16]  # person, car, dog
    if 'bbox_head.retina_cls.bias' in state:  # RetinaNet: sigmoid per anchor and class
        bias = torch.full_like(state['bbox_head.retina_cls.bias'], -20.).view(-1, 80)
        bias[:, wanted] = 0
        state['bbox_head.retina_cls.bias'] = bias.flatten()
    elif 'roi_head.bbox_head.fc_cls.bias' in state:  # Mask R-CNN: softmax, 80 + background
        bias = torch.full_like(state['roi_head.bbox_head.fc_cls.bias'], -20.)
        bias[wanted] = 5
        state['roi_head.bbox_head.fc_cls.bias'] = bias
    torch.save(ckpt, out)
    return out


def train_then_resume(root, env, config, processes=1):
    """Train one epoch (or iteration) with ``processes`` processes, then resume the run
    with one process for a second one; returns the last checkpoint."""
    name = osp.splitext(osp.basename(config))[0]
    work_dir = root / 'work_dirs' / name
    by_iter = config == SEM_FPN  # an IterBasedTrainLoop
    length = 'train_cfg.max_iters={}' if by_iter else 'train_cfg.max_epochs={}'
    options = small_images(config)
    if by_iter:  # validate and save after every iteration instead of every 4000
        options += ['train_cfg.val_interval=1', 'default_hooks.checkpoint.interval=1']
    args = ('--work-dir', work_dir, '--cfg-options', length.format(1), *options)
    if processes == 1:
        run(tool('train.py', config, *args), root, env)
    else:
        cmd, denv = dist('dist_train.sh', config, processes, *args, env=env)
        run(cmd, root, denv)
        log = train_log(work_dir)
        assert 'Distributed launcher: pytorch' in log
        assert 'CPUDistributedDataParallel' in log
    first = work_dir / ('iter_1.pth' if by_iter else 'epoch_1.pth')
    assert first.is_file()

    # --resume without a value: from the latest checkpoint of the work dir
    run(tool('train.py', config, '--work-dir', work_dir, '--resume', '--cfg-options',
             length.format(2), *options), root, env)
    log = train_log(work_dir)
    assert f'Auto resumed from the latest checkpoint {first}' in log
    last = work_dir / ('iter_2.pth' if by_iter else 'epoch_2.pth')
    meta = torch.load(last, map_location='cpu', weights_only=False)['meta']
    assert (meta['iter'] if by_iter else meta['epoch']) == 2
    if by_iter:  # the resumed run trained iteration 2 only
        assert 'Saving checkpoint at 2 iterations' in log
        assert 'Saving checkpoint at 1 iterations' not in log
    else:  # the resumed run trained epoch 2 only
        assert 'Epoch(train) [2]' in log and 'Epoch(train) [1]' not in log
    return last


@pytest.mark.parametrize('config,metric', [
    (MASK_RCNN, 'coco/segm_mAP'), (SEM_FPN, 'mIoU')], ids=['mask_rcnn', 'sem_fpn'])
def test_train_resume_test(workspace, config, metric):
    """Train one epoch (or iteration), resume for a second one, test the result."""
    root, env = workspace
    last = train_then_resume(root, env, config)
    test_dir = root / 'test_dirs' / osp.basename(config)
    checkpoint = confident_checkpoint(last, root / 'confident.pth')
    run(tool('test.py', config, checkpoint, '--work-dir', test_dir, '--cfg-options',
             *small_images(config)), root, env)
    assert metric in read_metrics(test_dir)


def test_retinanet_two_processes_on_cpu(workspace):
    """RetinaNet: dist_train.sh with 2 gloo processes, resumed by train.py with one; then
    dist_test.sh with 2 processes makes the very predictions and reports the very metrics
    of test.py with one."""
    root, env = workspace
    options = small_images(RETINANET)
    last = train_then_resume(root, env, RETINANET, processes=2)
    checkpoint = confident_checkpoint(last, root / 'confident.pth')

    run(tool('test.py', RETINANET, checkpoint, '--work-dir', root / 'test_dirs' / 'one',
             '--out', root / 'one.pkl', '--cfg-options', *options), root, env)
    cmd, denv = dist('dist_test.sh', RETINANET, checkpoint, 2, '--work-dir',
                     root / 'test_dirs' / 'two', '--out', root / 'two.pkl',
                     '--cfg-options', *options, env=env)
    run(cmd, root, denv)
    one = read_metrics(root / 'test_dirs' / 'one')
    two = read_metrics(root / 'test_dirs' / 'two')
    assert 'coco/bbox_mAP' in one and one == two
    with open(root / 'one.pkl', 'rb') as f:
        preds_one = pickle.load(f)
    with open(root / 'two.pkl', 'rb') as f:
        preds_two = pickle.load(f)
    assert [p['img_id'] for p in preds_one] == [p['img_id'] for p in preds_two] == [1, 2]
    for a, b in zip(preds_one, preds_two):
        a, b = a['pred_instances'], b['pred_instances']
        assert len(a['scores']) == 100
        assert torch.equal(a['labels'], b['labels'])
        assert torch.equal(a['scores'], b['scores'])
        assert torch.equal(a['bboxes'], b['bboxes'])


def test_missing_coco_stops_training_with_a_message(tmp_path, workspace):
    _, env = workspace
    result = run(tool('train.py', RETINANET), tmp_path, env, expect_rc=2)
    assert 'Traceback' not in result.stderr
    assert 'missing annotation file: data/coco/annotations/instances_train2017.json' \
        in result.stderr
    assert 'https://cocodataset.org/#download' in result.stderr
    assert not (tmp_path / 'work_dirs').exists()


def test_missing_ade20k_stops_testing_with_a_message(tmp_path, monkeypatch, capsys):
    """The same check in test.py, run in this process (no second start-up)."""
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    monkeypatch.chdir(tmp_path)
    test_tool = load_script('tools/test.py')
    with pytest.raises(SystemExit) as exit_info:
        test_tool.main([SEM_FPN, str(checkpoint)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert 'missing img_path folder: data/ade/ADEChallengeData2016/images/validation' \
        in message
    assert 'ADEChallengeData2016.zip' in message
    assert not (tmp_path / 'work_dirs').exists()


def test_checkpoint_globals_stay_safe(tmp_path):
    """The getattr that mmengine's checkpoints need reaches HistoryBuffer's statistics
    methods and nothing else."""
    import pickle as std_pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    from mmconvmlp.runner_utils import checkpoint_globals

    class Sneaky:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    buffer = HistoryBuffer()
    buffer.update(3.0)
    torch.save({'good': buffer}, tmp_path / 'good.pth')
    torch.save({'bad': Sneaky()}, tmp_path / 'bad.pth')
    with pytest.raises(std_pickle.UnpicklingError):  # safe loading refuses it by default
        torch.load(tmp_path / 'good.pth')
    with checkpoint_globals():
        loaded = torch.load(tmp_path / 'good.pth')['good']
        with pytest.raises(std_pickle.UnpicklingError, match='HistoryBuffer'):
            torch.load(tmp_path / 'bad.pth')
    assert loaded.mean() == 3.0


def test_benchmark_prints_one_row_per_case_and_outputs_agree():
    result = run(tool('benchmark_backbone.py', '--infer-input', '1x3x70x90',
                      '--train-input', '2x3x64x64', '--repeats', 4, '--bounds'),
                 cwd=ROOT, env=os.environ)
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines()
            if line.startswith('| ') and 'authors' not in line]
    assert [row[0].strip() for row in rows] == [
        'inference', 'train step (fwd+bwd)', 'with norm_eval', 'bound: no BatchNorm',
        'bound: no BN/ReLU/LN/GELU']
    assert [row[1].strip() for row in rows] == ['1x3x70x90'] + ['2x3x64x64'] * 4
    assert float(rows[0][5]) < 1e-5  # the two implementations agree
    bad = run(tool('benchmark_backbone.py', '--train-input', '2x3x64'), cwd=ROOT,
              env=os.environ, expect_rc=2)
    assert 'give BxCxHxW' in bad.stderr


def test_get_flops_reproduces_the_paper_for_convmlp_s():
    get_flops = load_script('tools/analysis/get_flops.py')
    macs, params = get_flops.count(get_flops.imagenet_model('s'), 224, 224)
    assert round(macs, 1) == 2.4 and round(params, 1) == 9.0
