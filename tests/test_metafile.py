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
#: The metafiles' CPU inference times, in the order of the README's img/s cells.
SPEED_KEYS = ('CPU FP32 (ms/im)', 'CPU BF16 (ms/im)', 'AVX2 FP32 (ms/im)')
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
    (img/s = 1000 / ms per image: float32 and bfloat16 on a CPU with AMX, float32 held to
    AVX2) and the released checkpoint's URL of every model are those of its README row."""
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
        times = [model['Metadata'][key] for key in SPEED_KEYS]
        assert speed == ' / '.join(f'{1000 / t:.2f}' for t in times), name
        assert re.search(r'\]\((\S+)\)', weights).group(1) == model['Weights'], name


def mim_field_name(key):
    """The column openmim 0.3.9's ``mim search`` gives a metadata key: its words joined by
    ``_`` and lower-cased, a last word holding ``(`` appended as it is, without the space
    (``'MACs (G@1280x800)'`` -> ``'macs(G@1280x800)'``); a list of dicts becomes one field per
    item, named with all its entries (how 81-character names came about)."""
    words = key.split()
    unit = words.pop() if '(' in key else ''
    return '_'.join(words).lower() + unit


def test_mim_search_shows_the_values_at_80_columns():
    """``mim search`` prints a field name padded to the longest name plus 2, and cuts every
    value to the 80 columns left: every name here leaves 58, so every value but the weights'
    URL (which --display-width 120 shows whole) is printed in full."""
    collections, models = load_index(osp.join(ROOT, 'model-index.yml'))
    fields = {}
    for entry in collections + models:
        for key, value in entry.get('Metadata', {}).items():
            assert not (isinstance(value, list) and isinstance(value[0], dict)), key
            fields[mim_field_name(key)] = value
    for model in models:
        for result in model['Results']:
            for metric, value in result['Metrics'].items():
                fields[f'{result["Dataset"].lower()}/{mim_field_name(metric)}'] = value
    assert {'coco/box_ap', 'coco/mask_ap', 'ade20k/miou', 'parameters', 'inference_cpu',
            'cpu_fp32(ms/im)', 'cpu_bf16(ms/im)', 'avx2_fp32(ms/im)'} <= set(fields)
    width = max(len(name) for name in fields) + 2
    assert width <= 22, sorted(fields, key=len)[-3:]
    for name, value in fields.items():
        text = ','.join(map(str, value)) if isinstance(value, list) else str(value)
        assert len(text) <= 80 - width, (name, text)


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

