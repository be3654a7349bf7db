from setuptools import find_packages, setup

setup(
    name='mmconvmlp',
    version='0.1.0',
    description='ConvMLP backbones for MMDetection 3.x and MMSegmentation 1.x',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmconvmlp', 'mmconvmlp.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.0',
        'mmengine>=0.10,<1.0',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.0,<3.4',
        'mmsegmentation>=1.0,<1.3',
        'timm>=1.0',
    ],
    license='MIT',
)
