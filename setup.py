"""Packaging of mmconvmlp.

Besides the package, the wheel carries OpenMMLab's model index (model-index.yml and the
metafiles under configs/), the configs and the tools in ``mmconvmlp/.mim/``: openmim reads
``<package>/.mim/model-index.yml`` for ``mim search`` and ``mim download``, and runs
``<package>/.mim/tools/`` for ``mim train`` / ``mim test``.
"""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = osp.dirname(osp.abspath(__file__))
#: What openmim finds in ``mmconvmlp/.mim/``: paths relative to the repository root.
MIM_ITEMS = ('model-index.yml', 'configs', 'tools')

# The lowest releases with what the code uses (each checked in that release's files):
#   torch 2.4: AdamW(fused=True) on CPU tensors (the demo configs); 2.3 added
#     torch.compiler.is_compiling, 2.1 checkpoint(context_fn=...);
#   mmdet 3.2: DetInferencer(...)(return_datasamples=...) (3.0 and 3.1 name it
#     return_datasample), used by tools/infer.py;
#   mmsegmentation 1.0: the sem_fpn base config and MMSegInferencer;
#   mmengine 0.7.1 and mmcv 2.0.0 up to 2.2.0: what mmdet 3.2 and 3.3 accept;
#   timm 1.0.3 (the first 1.x release): features_only through forward_intermediates
#     (feature_cls='getter'), which 0.9.16 lacks.
INSTALL_REQUIRES = [
    'torch>=2.4',
    'mmengine>=0.7.1,<1.0',
    'mmcv>=2.0.0,<2.2.0',
    'mmdet>=3.2.0,<3.4',
    'mmsegmentation>=1.0.0,<1.3',
    'timm>=1.0.3',
]


def copy_mim_items(target: str) -> None:
    """Copy :data:`MIM_ITEMS` from the repository into ``target``."""
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for item in MIM_ITEMS:
        source, destination = osp.join(ROOT, item), osp.join(target, item)
        if osp.isdir(source):
            shutil.copytree(source, destination, ignore=ignore, dirs_exist_ok=True)
        else:
            os.makedirs(target, exist_ok=True)
            shutil.copy2(source, destination)


class BuildPyWithMim(build_py):
    """``build_py`` that also puts :data:`MIM_ITEMS` into ``mmconvmlp/.mim/`` of the build.
    An editable install leaves them where they are, in the repository."""

    def run(self):
        super().run()
        if not getattr(self, 'editable_mode', False):
            copy_mim_items(osp.join(self.build_lib, 'mmconvmlp', '.mim'))


class SdistWithMim(sdist):
    """``sdist`` that also ships :data:`MIM_ITEMS`, so a wheel built from it has them."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        copy_mim_items(base_dir)


setup(
    name='mmconvmlp',
    version='0.1.0',
    description='ConvMLP backbones for MMDetection 3.x and MMSegmentation 1.x',
    long_description=open(osp.join(ROOT, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmconvmlp', 'mmconvmlp.*']),
    python_requires='>=3.9',
    install_requires=INSTALL_REQUIRES,
    cmdclass=dict(build_py=BuildPyWithMim, sdist=SdistWithMim),
    license='MIT',
)
