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
same numbers. ``CUDA_VISIBLE_DEVICES`` is empty: on a machine with GPUs too, the tools run
on the CPU and torchrun starts gloo processes.

MMDetection's and MMSegmentation's own ``tools/train.py`` and ``tools/test.py``, as their
wheels ship them, run the same configs: they build the config's ``ConvMLPRunner``.
"""
import argparse
import functools
import glob
import importlib.util
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys
import sysconfig

import pytest
import torch

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.engine import CheckpointUnreadableError, DataNotFoundError
from mmconvmlp.models import ConvMLPFeatures
from test_engine import CreatesFile

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
               MKL_NUM_THREADS='1', PYTHON=sys.executable, PYTHONWARNINGS='ignore',
               CUDA_VISIBLE_DEVICES='')
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


def wheel_tool(package, name, *args):
    """A tool as the wheel of ``package`` (mmdet, mmseg) ships it."""
    module = importlib.import_module(package)
    path = osp.join(osp.dirname(module.__file__), '.mim', 'tools', name)
    return [sys.executable, path, *map(str, args)]


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


def evaluate_in_process(root, config, checkpoint, monkeypatch, out=None):
    """The metrics of mmengine's own Runner (not ConvMLPRunner) testing ``checkpoint`` on
    the small images, in this process, with the one thread the tools' runs had; a
    detector's predictions go to the pickle file ``out`` when given."""
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner
    parser = argparse.ArgumentParser()
    parser.add_argument('--options', nargs='+', action=DictAction)
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(parser.parse_args(['--options', *small_images(config)]).options)
    cfg.pop('runner_type')
    cfg.work_dir = str(root / 'in_process' / osp.basename(config))
    cfg.load_from = str(checkpoint)
    monkeypatch.chdir(root)
    # On the CPU, as the tools ran (with CUDA_VISIBLE_DEVICES empty), on a GPU machine too.
    monkeypatch.setattr('mmengine.runner.runner.get_device', lambda: 'cpu')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = Runner.from_cfg(cfg)
        if out:
            from mmdet.evaluation import DumpDetResults
            runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=str(out)))
        return runner.test()
    finally:
        torch.set_num_threads(threads)


def train_log(work_dir):
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.log')))
    return open(logs[-1]).read()


def confident_checkpoint(checkpoint, out):
    """A copy of a checkpoint (all of it: an mmengine checkpoint, as training wrote it)
    whose classifier scores the generated classes well above the others: an all but
    untrained detector then makes many detections, above the test score threshold and
    with near-tied scores; a segmentor labels every pixel as background (ADE20K's 0 here),
    so that its mIoU is above 0 whatever its training."""
    ckpt = torch.load(checkpoint, map_location='cpu')
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
    elif 'decode_head.conv_seg.bias' in state:  # Semantic FPN: background everywhere
        bias = torch.full_like(state['decode_head.conv_seg.bias'], -20.)
        bias[0] = 0
        state['decode_head.conv_seg.bias'] = bias
        state['decode_head.conv_seg.weight'].zero_()
    torch.save(ckpt, out)
    return out


def train_then_resume(root, env, config, processes=1, resume_tool=tool):
    """Train one epoch (or iteration) with ``processes`` processes, then resume the run
    with one process of ``resume_tool``'s train.py for a second one; returns the last
    checkpoint."""
    name = osp.splitext(osp.basename(config))[0]
    work_dir = root / 'work_dirs' / name
    by_iter = config == SEM_FPN  # an IterBasedTrainLoop
    length = 'train_cfg.max_iters={}' if by_iter else 'train_cfg.max_epochs={}'
    options = [*small_images(config), 'randomness.seed=0']
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
    run(resume_tool('train.py', config, '--work-dir', work_dir, '--resume', '--cfg-options',
                    length.format(2), *options), root, env)
    log = train_log(work_dir)
    assert f'Auto resumed from the latest checkpoint {first}' in log
    last = work_dir / ('iter_2.pth' if by_iter else 'epoch_2.pth')
    meta = torch.load(last, map_location='cpu')['meta']
    assert (meta['iter'] if by_iter else meta['epoch']) == 2
    if by_iter:  # the resumed run trained iteration 2 only
        assert 'Saving checkpoint at 2 iterations' in log
        assert 'Saving checkpoint at 1 iterations' not in log
    else:  # the resumed run trained epoch 2 only
        assert 'Epoch(train) [2]' in log and 'Epoch(train) [1]' not in log
    return last


@pytest.mark.parametrize('config,metric,package', [
    (MASK_RCNN, 'coco/segm_mAP', None), (SEM_FPN, 'mIoU', 'mmseg')],
    ids=['mask_rcnn', 'sem_fpn_with_mmseg_tools'])
def test_train_resume_test(workspace, monkeypatch, config, metric, package):
    """Train one epoch (or iteration), resume for a second one, test the result: with the
    tools here, or with the resume and the test run by MMSegmentation's own tools. The
    metrics are those mmengine's own Runner computes for the checkpoint in this process."""
    root, env = workspace
    own = tool if package is None else functools.partial(wheel_tool, package)
    last = train_then_resume(root, env, config, resume_tool=own)
    test_dir = root / 'test_dirs' / osp.basename(config)
    checkpoint = confident_checkpoint(last, root / 'confident.pth')
    run(own('test.py', config, checkpoint, '--work-dir', test_dir, '--cfg-options',
            *small_images(config)), root, env)
    out = root / 'mask_rcnn_in_process.pkl' if config == MASK_RCNN else None
    expected = evaluate_in_process(root, config, checkpoint, monkeypatch, out=out)
    assert metric in expected
    if out:  # what was evaluated: detections with masks, on every image (an all but
        # untrained model may score 0.0 on all metrics, by luck)
        with open(out, 'rb') as f:
            predictions = [p['pred_instances'] for p in pickle.load(f)]
        assert len(predictions) == 2
        assert all(len(p['scores']) and len(p['masks']) for p in predictions)
    else:
        assert expected[metric] > 0
    measured = read_metrics(test_dir)
    assert {name: measured[name] for name in expected} == pytest.approx(expected, abs=1e-6)


def test_retinanet_two_processes_on_cpu(workspace, monkeypatch):
    """RetinaNet: dist_train.sh with 2 gloo processes, resumed by MMDetection's own
    train.py with one; then dist_test.sh with 2 processes makes the very predictions and
    reports the very metrics of MMDetection's own test.py with one, and those of
    mmengine's Runner in this process (the predictions too: the metrics of this all but
    untrained model are zeros)."""
    root, env = workspace
    options = small_images(RETINANET)
    mmdet_tool = functools.partial(wheel_tool, 'mmdet')
    last = train_then_resume(root, env, RETINANET, processes=2, resume_tool=mmdet_tool)
    checkpoint = confident_checkpoint(last, root / 'confident.pth')

    run(mmdet_tool('test.py', RETINANET, checkpoint, '--work-dir',
                   root / 'test_dirs' / 'one', '--out', root / 'one.pkl', '--cfg-options',
                   *options), root, env)
    cmd, denv = dist('dist_test.sh', RETINANET, checkpoint, 2, '--work-dir',
                     root / 'test_dirs' / 'two', '--out', root / 'two.pkl',
                     '--cfg-options', *options, env=env)
    run(cmd, root, denv)
    one = read_metrics(root / 'test_dirs' / 'one')
    two = read_metrics(root / 'test_dirs' / 'two')
    assert 'coco/bbox_mAP' in one and one == two
    expected = evaluate_in_process(root, RETINANET, checkpoint, monkeypatch,
                                   out=root / 'in_process.pkl')
    assert {name: one[name] for name in expected} == pytest.approx(expected, abs=1e-6)
    preds = {}
    for name in ('one', 'two', 'in_process'):
        with open(root / f'{name}.pkl', 'rb') as f:
            preds[name] = pickle.load(f)
        assert [p['img_id'] for p in preds[name]] == [1, 2]
    for a, b, c in zip(preds['one'], preds['two'], preds['in_process']):
        a, b, c = a['pred_instances'], b['pred_instances'], c['pred_instances']
        assert len(a['scores']) == 100
        for key in ('labels', 'scores', 'bboxes'):
            assert torch.equal(a[key], b[key])
            torch.testing.assert_close(a[key], c[key])


def test_missing_coco_stops_training_with_a_message(tmp_path, workspace):
    """MMDetection's own train.py (which builds the config's ConvMLPRunner, as
    tools/train.py does): one message, no traceback, nothing trained."""
    _, env = workspace
    result = run(wheel_tool('mmdet', 'train.py', RETINANET), tmp_path, env, expect_rc=1)
    assert 'Traceback' not in result.stderr
    assert 'DataNotFoundError: The data set of' in result.stderr
    assert 'missing annotation file: data/coco/annotations/instances_train2017.json' \
        in result.stderr
    assert 'https://cocodataset.org/#download' in result.stderr
    assert not glob.glob(str(tmp_path / '**' / '*.pth'), recursive=True)


def test_missing_ade20k_stops_testing_with_a_message(tmp_path, monkeypatch):
    """The same check in test.py, run in this process (no second start-up)."""
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    monkeypatch.chdir(tmp_path)
    test_tool = load_script('tools/test.py')
    with pytest.raises(DataNotFoundError) as error:
        test_tool.main([SEM_FPN, str(checkpoint)])
    assert 'missing img_path folder: data/ade/ADEChallengeData2016/images/validation' \
        in str(error.value)
    assert 'ADEChallengeData2016.zip' in str(error.value)


def test_an_empty_checkpoint_stops_testing_with_a_message(workspace, monkeypatch):
    """tools/test.py, in this process, on data that exists."""
    root, _ = workspace
    checkpoint = root / 'empty.pth'
    checkpoint.write_bytes(b'')
    monkeypatch.chdir(root)
    test_tool = load_script('tools/test.py')
    with pytest.raises(CheckpointUnreadableError) as error:
        test_tool.main([RETINANET, str(checkpoint), '--work-dir', str(root / 'empty_test'),
                        '--cfg-options', *small_images(RETINANET)])
    assert str(error.value).startswith(
        f'{checkpoint} cannot be loaded as a checkpoint: the file is empty (0 bytes).')


def test_mmdet_test_refuses_a_checkpoint_that_would_run_code(tmp_path, workspace):
    """MMDetection's own test.py: one message, nothing run, nothing created."""
    root, env = workspace
    marker = tmp_path / 'created'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': CreatesFile(marker)}, evil)
    result = run(wheel_tool('mmdet', 'test.py', RETINANET, evil, '--work-dir',
                            tmp_path / 'work', '--cfg-options', *small_images(RETINANET)),
                 root, env, expect_rc=1)
    assert 'Traceback' not in result.stderr
    assert f'CheckpointRefusedError: {evil} was refused: loading it would run code' \
        in result.stderr
    assert not marker.exists()


def test_get_flops_reproduces_the_paper_for_convmlp_s():
    get_flops = load_script('tools/analysis/get_flops.py')
    macs, params = get_flops.count(get_flops.imagenet_model('s'), 224, 224)
    assert round(macs, 1) == 2.4 and round(params, 1) == 9.0


def canonical(name: str) -> str:
    return name.lower().replace('_', '-').replace('.', '-')


def test_constraints_pin_the_installed_stack():
    """requirements/constraints.txt, which tools/setup_env.sh installs from, names every
    package of requirements/runtime.txt and the version installed here of each package."""
    from importlib import metadata
    pins = {}
    with open(osp.join(ROOT, 'requirements', 'constraints.txt')) as f:
        for line in f:
            if '==' in line and not line.startswith('#'):
                name, version = line.strip().split('==')
                pins[canonical(name)] = version
    site_packages = sysconfig.get_paths()['purelib']  # not the copies other packages vendor
    installed = {canonical(d.metadata['Name']): d.version
                 for d in metadata.distributions(path=[site_packages])}
    differing = {name: (version, installed[name]) for name, version in pins.items()
                 if name in installed and installed[name] != version}
    assert not differing, f'pinned vs installed: {differing}'
    with open(osp.join(ROOT, 'requirements', 'runtime.txt')) as f:
        required = [canonical(line.split('=')[0].split('>')[0].split('<')[0].strip())
                    for line in f if line.strip() and not line.startswith('#')]
    assert set(required) <= set(pins), set(required) - set(pins)
    assert {'torch', 'torchvision', 'mmcv', 'setuptools'} <= set(pins)


def test_analyze_logs_of_mmdet_and_mmseg_plot_a_runs_log(tmp_path):
    """mmdet's and mmseg's analyze_logs.py (which import seaborn and pandas, installed by the
    set-up) plot the loss and the validation metric of a log as training writes it
    (vis_data/scalars.json: a line per logged iteration, one per validation)."""
    log = tmp_path / 'scalars.json'
    lines = []
    for epoch in (1, 2):
        for n in (1, 2, 3, 4):
            step = 8 * (epoch - 1) + 2 * n
            lines.append(dict(lr=1e-4, loss=1.5 / step, time=0.3, epoch=epoch, iter=step,
                              step=step))
        lines.append({'coco/bbox_mAP': 0.1 * epoch, 'mIoU': 10.0 * epoch, 'step': epoch})
    log.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    tools = 'analysis_tools/analyze_logs.py'
    env = dict(os.environ, MPLBACKEND='Agg', PYTHONWARNINGS='ignore')
    outputs = []
    for args in (wheel_tool('mmdet', tools, 'plot_curve', log, '--keys', 'loss', 'bbox_mAP',
                            '--out', tmp_path / 'det.png'),
                 wheel_tool('mmdet', tools, 'cal_train_time', log),
                 wheel_tool('mmseg', tools, log, '--keys', 'loss', 'mIoU',
                            '--out', tmp_path / 'seg.png')):
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert (tmp_path / 'det.png').stat().st_size and (tmp_path / 'seg.png').stat().st_size
    assert 'average iter time: 0.3000 s/iter' in outputs[1]
