"""OpenMMLab's model index (model-index.yml and the metafiles it imports), read the way openmim
reads it, against the README's table of the paper's models; and the wheel that carries it in
``mmconvmlp/.mim/``, where openmim looks."""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import zipfile

import yaml

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {  # the nine paper models: config name -> README's words for its results
    **{f'retinanet_convmlp_{a}_coco': ('box AP',) for a in 'sml'},
    **{f'mask_rcnn_convmlp_{a}_coco': ('box AP', 'mask AP') for a in 'sml'},
    **{f'fpn_convmlp_{a}_ade20k': ('mIoU',) for a in 'sml'},
}


def load_index(index_file):
    """(collections, models) of a model index, its ``Import`` entries read relative to the
    index's folder, as openmim's model-index library does."""
    with open(index_file) as f:
        index = yaml.safe_load(f)
    collections, models = [], []
    for metafile in index['Import']:
        with open(osp.join(osp.dirname(index_file), metafile)) as f:
            meta = yaml.safe_load(f)
        collections += meta.get('Collections', [])
        models += meta['Models']
    return collections, models


def readme_rows():
    """README's table of the paper's models: config name -> the cells of its row."""
    rows = {}
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        for line in f:
            found = re.search(r'\]\(configs/\w+/(\w+)\.py\)', line)
            if line.startswith('|') and found:
                rows[found.group(1)] = [cell.strip() for cell in line.strip('|\n').split('|')]
    return rows


def test_index_names_the_nine_paper_models_with_configs_that_exist():
    collections, models = load_index(osp.join(ROOT, 'model-index.yml'))
    assert sorted(m['Name'] for m in models) == sorted(CONFIGS)
    collection_names = {c['Name'] for c in collections}
    for model in models:
        assert model['In Collection'] in collection_names, model['Name']
        task = 'segmentation' if model['Name'].endswith('ade20k') else 'detection'
        assert model['Config'] == f'configs/{task}/{model["Name"]}.py'
        assert osp.isfile(osp.join(ROOT, model['Config'])), model['Config']


def test_numbers_and_weights_match_the_readme_table():
    """Results, parameters (the README's built count, in M to 2 decimals), MACs, CPU speed
    (img/s = 1000 / ms per image, on AVX-512 and held to AVX2) and the released checkpoint's
    URL of every model are those of its README row."""
    _, models = load_index(osp.join(ROOT, 'model-index.yml'))
    rows = readme_rows()
    for model in models:
        name = model['Name']
        _task, _title, _config, params, macs, speed, results, weights = rows[name]
        metrics = {k: v for r in model['Results'] for k, v in r['Metrics'].items()}
        assert sorted(metrics) == sorted(CONFIGS[name])
        # README: '38.4 box / 35.7 mask AP', '37.2 box AP', '35.8 mIoU'
        readme_results = dict(zip(re.findall(r'(box|mask|mIoU)', results),
                                  map(float, re.findall(r'\d+\.\d', results))))
        for metric, value in metrics.items():
            assert readme_results[metric.split()[0]] == value, (name, metric)
        assert f'/ {model["Metadata"]["Parameters"] / 1e6:.2f}M' in params, name
        mac_values = [v for k, v in model['Metadata'].items() if k.startswith('MACs')]
        assert mac_values and all(f'{v:.1f}' in macs for v in mac_values), name
        times = model['Metadata']['inference time (ms/im)']
        assert [t['hardware'].split(', ')[-1] for t in times] == ['AVX-512', 'held to AVX2']
        assert speed == ' / '.join(f'{1000 / t["value"]:.2f}' for t in times), name
        assert re.search(r'\]\((\S+)\)', weights).group(1) == model['Weights'], name


def test_wheel_carries_the_index_configs_and_tools(tmp_path):
    """setup.py puts model-index.yml, configs/ and tools/ into mmconvmlp/.mim/ of the wheel,
    and every config the index names is there."""
    source = tmp_path / 'source'
    source.mkdir()
    for item in ('setup.py', 'README.md', 'model-index.yml'):
        shutil.copy2(osp.join(ROOT, item), source / item)
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for item in ('mmconvmlp', 'configs', 'tools'):
        shutil.copytree(osp.join(ROOT, item), source / item, ignore=ignore)
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
         '-w', str(tmp_path / 'dist'), str(source)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / 'dist').glob('mmconvmlp-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / 'installed')
    mim = tmp_path / 'installed' / 'mmconvmlp' / '.mim'
    _, models = load_index(str(mim / 'model-index.yml'))
    assert len(models) == len(CONFIGS)
    for model in models:
        assert (mim / model['Config']).is_file(), model['Config']
    assert (mim / 'tools' / 'train.py').is_file() and (mim / 'tools' / 'test.py').is_file()

