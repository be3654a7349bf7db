"""The CUDA paths, checked without a GPU: a GPU run with CPU-only mmcv ops stops before
training, MPI and multi-node launches name the first node, Slurm runs the repository's
Python, and the set-up refuses options it does not know.

One test checks a CUDA build of mmcv itself (``bash tools/setup_env.sh --cuda``); it is
opt-in, since CI cannot afford that build: ``MMCONVMLP_CUDA_VENV=PATH/.venv`` names the
environment to check (see the README's "GPU cluster" section).
"""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from mmconvmlp.engine import cuda_ops
from mmconvmlp.engine.cpu_processes import LauncherError, check_launcher_environment
from mmconvmlp.engine.cuda_ops import MissingCudaOpsError, check_mmcv_cuda_ops
from mmconvmlp.engine.runner import ConvMLPRunner

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CUDA_LAUNCHERS = ('NMSCUDAKernelLauncher', 'ROIAlignForwardCUDAKernelLauncher',
                  'SigmoidFocalLossForwardCUDAKernelLauncher')


def simulate_gpu(monkeypatch, mmcv_cuda):
    """A visible GPU, and mmcv's ops compiled with CUDA ``mmcv_cuda`` ('' for none) as mmcv
    reports it (``get_compiling_cuda_version`` says 'not available' for a CPU build)."""
    import mmcv.ops
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100')
    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version',
                        lambda: mmcv_cuda or 'not available')


def test_a_gpu_run_with_cpu_only_mmcv_stops_before_training(monkeypatch):
    simulate_gpu(monkeypatch, mmcv_cuda='')
    with pytest.raises(MissingCudaOpsError) as error:
        ConvMLPRunner.from_cfg(Config(dict(model=dict(), work_dir='.')))
    message = str(error.value)
    assert '\n' not in message and 'built without CUDA ops' in message
    assert '`bash tools/setup_env.sh --cuda`' in message and 'NVIDIA H100' in message


def test_cuda_ops_pass_on_a_gpu_and_cpu_ops_without_one(monkeypatch):
    simulate_gpu(monkeypatch, mmcv_cuda='13.0')
    check_mmcv_cuda_ops()
    assert cuda_ops.mmcv_cuda_version() == '13.0'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    import mmcv.ops
    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version', lambda: 'not available')
    check_mmcv_cuda_ops()  # CPU ops are enough without a GPU


def linked_libraries(path):
    out = subprocess.run(['readelf', '-d', path], capture_output=True, text=True,
                         check=True).stdout
    return [line.split('[')[1].rstrip(']') for line in out.splitlines() if 'NEEDED' in line]


def mmcv_ext_path(python=sys.executable):
    code = ('import glob, os, mmcv; print(glob.glob(os.path.join(os.path.dirname('
            'mmcv.__file__), "_ext*.so"))[0])')
    return subprocess.run([python, '-c', code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_check_reads_the_installed_mmcv_as_its_library_says():
    """The installed mmcv (CPU or CUDA build): its own report of its CUDA version, which
    the check reads, agrees with whether its library links the CUDA runtime."""
    links_cudart = any('libcudart' in lib for lib in linked_libraries(mmcv_ext_path()))
    assert bool(cuda_ops.mmcv_cuda_version()) == links_cudart


def ompi(monkeypatch, size, local_size, master_addr=None):
    """The variables Open MPI's mpirun sets in a process: ``size`` processes in all,
    ``local_size`` of them on this node."""
    env = dict(OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_SIZE=str(size),
               OMPI_COMM_WORLD_LOCAL_RANK='0', OMPI_COMM_WORLD_LOCAL_SIZE=str(local_size))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if master_addr is None:
        monkeypatch.delenv('MASTER_ADDR', raising=False)
    else:
        monkeypatch.setenv('MASTER_ADDR', master_addr)


def test_mpi_across_nodes_needs_the_first_nodes_address(monkeypatch):
    """mmengine's MPI start reads MASTER_ADDR, which mpirun does not set; 127.0.0.1 on
    every node would leave each node waiting for the others."""
    ompi(monkeypatch, size=8, local_size=4)
    with pytest.raises(LauncherError, match=r'--launcher mpi: MASTER_ADDR not set; .*'
                                            r'mpirun -x MASTER_ADDR=HOST'):
        check_launcher_environment('mpi')
    assert 'MASTER_ADDR' not in os.environ
    ompi(monkeypatch, size=8, local_size=4, master_addr='node017')
    check_launcher_environment('mpi')
    assert os.environ['MASTER_ADDR'] == 'node017'


def test_mpi_on_one_node_talks_over_this_node(monkeypatch):
    ompi(monkeypatch, size=4, local_size=4)
    check_launcher_environment('mpi')
    assert os.environ['MASTER_ADDR'] == '127.0.0.1'


def fake_command(tmp_path, name):
    """An executable ``name`` that prints its arguments, one a line."""
    path = tmp_path / name
    path.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)
    return str(path)


def test_slurm_runs_the_repositorys_python(tmp_path):
    fake_command(tmp_path, 'srun')
    env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}'}
    env.pop('PYTHON', None)
    result = subprocess.run(['bash', 'tools/slurm_launch.sh', 'gpu', 'job', 'train.py', 'c.py'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    python = args[args.index('-u') - 1]
    assert osp.samefile(python, osp.join(ROOT, '.venv', 'bin', 'python'))
    assert args[-4:] == [osp.join(ROOT, 'tools', 'train.py'), 'c.py', '--launcher', 'slurm']


def test_torchrun_across_nodes_needs_the_first_nodes_address(tmp_path):
    python = fake_command(tmp_path, 'python')
    env = {**os.environ, 'PYTHON': python, 'NNODES': '2', 'NODE_RANK': '1'}
    env.pop('MASTER_ADDR', None)
    launch = ['bash', 'tools/dist_launch.sh', 'train.py', '4', 'c.py']
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and 'set MASTER_ADDR' in result.stderr
    assert result.stdout == ''
    single = subprocess.run(launch, cwd=ROOT, env={**env, 'NNODES': '1'},
                            capture_output=True, text=True, timeout=60, check=True)
    assert '--master_addr=127.0.0.1' in single.stdout.splitlines()


def test_setup_refuses_an_unknown_option(tmp_path):
    """Run from a copy, so that a set-up that ignored the option would build in tmp_path."""
    (tmp_path / 'tools').mkdir()
    script = tmp_path / 'tools' / 'setup_env.sh'
    script.write_text(open(osp.join(ROOT, 'tools', 'setup_env.sh')).read())
    result = subprocess.run(['bash', str(script), '--gpu'], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "unknown option '--gpu'; use --cuda" in result.stderr


# A stand-in for .venv/bin/python in a copy of the repository: it logs pip's calls (a built
# wheel is an empty file in the folder given), and answers the set-up's questions from the
# environment: FAKE_GPUS (visible architectures), the installed mmcv's _ext (a copy of a
# torch library that links libcudart for a CUDA wheel, of one that does not for a CPU one).
FAKE_PYTHON = r"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "pip ${*:3}" >> "$FAKE/log"
  case "$3" in
    cache) echo "$FAKE/pipcache" ;;
    wheel) echo "build FORCE_CUDA=$FORCE_CUDA ARCHS=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-}" >> "$FAKE/log"
           while [ $# -gt 0 ]; do
             [ "$1" = -w ] && mkdir -p "$2" && touch "$2/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
             shift
           done ;;
    install) for a in "$@"; do
               case "$a" in
                 *cuda-*.whl) cp "$FAKE_CUDA_LIB" "$FAKE/_ext.so" ;;
                 *.whl) cp "$FAKE_CPU_LIB" "$FAKE/_ext.so" ;;
                 nvidia-cuda-nvcc*) mkdir -p "$FAKE/site/nvidia/cu13/bin" "$FAKE/site/nvidia/cu13/lib"
                                    printf '#!/bin/sh\n' > "$FAKE/site/nvidia/cu13/bin/nvcc"
                                    chmod +x "$FAKE/site/nvidia/cu13/bin/nvcc" ;;
               esac
             done ;;
  esac
  exit 0
fi
if [ "$1" = - ]; then code=$(cat); else code=$2; fi
case "$code" in
  *find_spec*) [ -f "$FAKE/_ext.so" ] && echo "$FAKE/_ext.so" ;;
  *get_device_capability*) echo "${FAKE_GPUS:-}" ;;
  *torch.version.cuda*) echo 13.0 ;;
  *sysconfig*) echo "$FAKE/site" ;;
  *version_info*) echo torch2.13.0+cu130-cp311 ;;
esac
exit 0
"""


@pytest.fixture
def fake_setup(tmp_path):
    """Run tools/setup_env.sh in a copy of the repository whose .venv/bin/python is
    FAKE_PYTHON; returns run(*args, **env) -> (output, the pip calls of that run)."""
    (tmp_path / 'tools').mkdir()
    for name in ('tools/setup_env.sh', 'setup.py', 'requirements'):
        subprocess.run(['cp', '-r', osp.join(ROOT, name), str(tmp_path / name)], check=True)
    (tmp_path / '.venv' / 'bin').mkdir(parents=True)
    python = tmp_path / '.venv' / 'bin' / 'python'
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    fake_nm = tmp_path / 'bin' / 'nm'  # the CUDA launchers, as a CUDA build's _ext holds
    fake_nm.parent.mkdir()
    fake_nm.write_text('#!/bin/sh\nprintf "T %s\\n" ' + ' '.join(CUDA_LAUNCHERS) + '\n')
    fake_nm.chmod(0o755)
    torch_lib = osp.join(osp.dirname(torch.__file__), 'lib')
    env = {'PATH': f'{tmp_path / "bin"}:/usr/bin:/bin', 'HOME': str(tmp_path),
           'FAKE': str(tmp_path), 'FAKE_CPU_LIB': osp.join(torch_lib, 'libc10.so'),
           'FAKE_CUDA_LIB': osp.join(torch_lib, 'libc10_cuda.so')}

    def run(*args, **extra):
        (tmp_path / 'log').write_text('')
        result = subprocess.run(['bash', 'tools/setup_env.sh', *args], cwd=tmp_path,
                                env={**env, **extra}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout, (tmp_path / 'log').read_text().splitlines()
    run.stamp = tmp_path / '.venv' / '.mmconvmlp-setup'
    return run


def builds(pip_calls):
    return [line for line in pip_calls if line.startswith('build ')]


@pytest.mark.skipif(not osp.exists(osp.join(osp.dirname(torch.__file__), 'lib',
                                            'libc10_cuda.so')),
                    reason="torch's CUDA build lends the library that links libcudart")
def test_setup_builds_the_kind_wanted_and_never_mixes_them(fake_setup):
    out, calls = fake_setup()  # no GPU: CPU ops
    assert builds(calls) == ['build FORCE_CUDA=0 ARCHS= CUDA_HOME=']
    assert 'has CPU ops only' in out
    assert fake_setup.stamp.read_text().splitlines()[1] == 'mmcv=cpu'

    out, calls = fake_setup()  # again: seconds, nothing installed
    assert calls == [] and out == ''
    stamp = fake_setup.stamp.read_text()
    fake_setup.stamp.write_text('a set-up of an older version\n')
    out, calls = fake_setup()  # a changed set-up re-checks but keeps the CPU build
    assert calls and builds(calls) == [] and fake_setup.stamp.read_text() == stamp

    out, calls = fake_setup('--cuda')  # login node: every architecture, CUDA 13.0's nvcc
    (build,) = builds(calls)
    assert build.startswith('build FORCE_CUDA=1 ARCHS=7.5;8.0;8.6;9.0;10.0;12.0+PTX CUDA_HOME=/')
    assert 'CUDA ops for 6 architecture(s)' in out and 'CPU-minutes per architecture' in out
    assert any('nvidia-cuda-nvcc==13.0.*' in call for call in calls) or 'CUDA_HOME=/usr/' in build
    assert 'has CUDA ops' in out
    wheels = sorted(p.name for p in (fake_setup.stamp.parent.parent / 'pipcache' /
                                     'mmconvmlp-mmcv').iterdir())
    assert len(wheels) == 2 and 'cpu' in wheels[0] and 'cuda-7.5-8.0' in wheels[1]

    assert fake_setup() == ('', [])  # no GPU, no --cuda: the CUDA build stays
    assert fake_setup(FAKE_GPUS='8.9') == ('', [])  # sm_86 code runs on an 8.9 GPU

    out, calls = fake_setup(TORCH_CUDA_ARCH_LIST='9.0', FORCE_CUDA='1')
    assert builds(calls)[0].startswith('build FORCE_CUDA=1 ARCHS=9.0 ')
    assert fake_setup.stamp.read_text().splitlines()[1] == 'mmcv=cuda archs=9.0'
    out, calls = fake_setup(FAKE_GPUS='8.0')  # a GPU that 9.0 code does not run on
    assert builds(calls)[0].startswith('build FORCE_CUDA=1 ARCHS=8.0 ')


CUDA_VENV = os.environ.get('MMCONVMLP_CUDA_VENV')


@pytest.mark.skipif(not CUDA_VENV, reason='opt-in: MMCONVMLP_CUDA_VENV=PATH/.venv names an '
                    "environment built by 'bash tools/setup_env.sh --cuda'")
def test_a_cuda_build_of_mmcv_holds_cuda_ops_and_runs_cpu_ops():
    """The environment's mmcv links the CUDA runtime, holds the CUDA launchers of NMS,
    RoIAlign and sigmoid focal loss, reports its CUDA version, and still runs its CPU ops."""
    python = osp.join(CUDA_VENV, 'bin', 'python')
    ext = mmcv_ext_path(python)
    assert any(lib.startswith('libcudart.so') for lib in linked_libraries(ext)), ext
    symbols = subprocess.run(['nm', '-D', '--defined-only', ext], capture_output=True,
                             text=True, check=True).stdout
    assert [name for name in CUDA_LAUNCHERS if name not in symbols] == []
    code = '\n'.join([
        'import torch',
        'from mmcv.ops import get_compiling_cuda_version, nms, roi_align',
        'boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])',
        'print(nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1].tolist())',
        'feature = torch.arange(16.).view(1, 1, 4, 4)',
        'rois = torch.tensor([[0., 0., 0., 4., 4.]])',
        'print(roi_align(feature, rois, (2, 2), 1.0, 2, "avg", True).flatten().tolist())',
        'print(get_compiling_cuda_version(), torch.version.cuda)'])
    out = subprocess.run([python, '-c', code], capture_output=True, text=True, timeout=300,
                         check=True).stdout.splitlines()
    assert out[0] == '[0, 2]'
    pooled = [round(float(v), 3) for v in out[1].strip('[]').split(',')]
    assert pooled == [2.5, 4.5, 10.5, 12.5]
    compiled, torch_cuda = out[2].split()
    assert compiled == torch_cuda
