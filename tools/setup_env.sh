#!/usr/bin/env bash
# Builds the environment in .venv/ at the repository root: torch + torchvision, mmcv 2.1.0 with
# its compiled ops, mmengine, mmdet, mmsegmentation, timm and mmconvmlp itself (editable).
# Every package, dependencies included, comes at the version in requirements/constraints.txt:
# the stack the test suite passed with. Safe to run again: when .venv/ is already complete it
# only re-checks the imports and mmcv's ops (seconds).
#   bash tools/setup_env.sh           build or check .venv/; mmcv's ops get CUDA kernels where
#                                     a GPU is visible, else CPU kernels only
#   bash tools/setup_env.sh --cuda    CUDA kernels without a visible GPU (a login node), for
#                                     the architectures in $DEFAULT_CUDA_ARCHS below
#   bash tools/setup_env.sh --freeze  rewrite requirements/constraints.txt from .venv/
#                                     (after the suite passed on a changed stack)
# CUDA builds: TORCH_CUDA_ARCH_LIST (e.g. "9.0") overrides the architectures; MAX_JOBS the
# number of parallel compilers (default: all cores). Where no CUDA toolkit of torch's CUDA
# version with its headers is installed, nvcc and the headers come from the package registry
# into .venv/. mmcv's wheels are kept apart by kind (CPU, or CUDA and its architectures) in
# pip's cache folder, so one kind is never installed for the other.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

TORCH_PINS=(torch==2.13.0 torchvision==0.28.0)
MMCV_VERSION=2.1.0
CONSTRAINTS=(-c requirements/constraints.txt)
# The GPUs torch 2.13+cu130 runs on: Turing (T4) to Blackwell; PTX for newer ones.
DEFAULT_CUDA_ARCHS="7.5;8.0;8.6;9.0;10.0;12.0+PTX"
# Measured on this project's 2-core build machine: CPU time of the CPU kernels, and of the
# 58 CUDA files for each architecture (see the README's "GPU cluster" section).
CPU_MINUTES_BASE=22 CPU_MINUTES_PER_ARCH=36
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.mmconvmlp-setup"

say() { echo "setup_env: $*"; }
die() { echo "setup_env: $*" >&2; exit 1; }

want_cuda=0
case "${1:-}" in
  --freeze|"") ;;
  --cuda) want_cuda=1 ;;
  *) die "unknown option '$1'; use --cuda (CUDA ops without a visible GPU) or --freeze" ;;
esac
# mmcv's own switch means the same.
[ "${FORCE_CUDA:-0}" = 1 ] && want_cuda=1
fingerprint=$(cat tools/setup_env.sh requirements/*.txt setup.py | sha256sum | cut -d' ' -f1)

check_imports() {
  "$py" - <<'PY'
import importlib, sys
failed = []
for name in ('torch', 'torchvision', 'timm', 'mmengine', 'mmcv.ops', 'mmdet.models',
             'mmseg.models', 'mmconvmlp', 'psutil', 'onnx', 'onnxruntime'):
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every failure, not just the first
        failed.append(f'  {name}: {type(exc).__name__}: {exc}')
if failed:
    print('setup_env: these packages do not import:\n' + '\n'.join(failed), file=sys.stderr)
    sys.exit(1)
PY
}

if [ "${1:-}" = "--freeze" ]; then
  {
    echo "# The tested stack: tools/setup_env.sh installs every package at this version."
    echo "# Written by 'bash tools/setup_env.sh --freeze' from a .venv the test suite passed in."
    PIP_CONFIG_FILE=/dev/null "$py" -m pip freeze --all --exclude-editable \
      | grep -v -i -E '^(pip|mmconvmlp)=='
  } > requirements/constraints.txt.new
  mv requirements/constraints.txt.new requirements/constraints.txt
  say "wrote requirements/constraints.txt ($(grep -c '==' requirements/constraints.txt) packages)"
  exit 0
fi

# The compiled library of the installed mmcv (nothing if mmcv $MMCV_VERSION is not installed).
mmcv_ext() {
  "$py" - "$MMCV_VERSION" <<'PY' 2>/dev/null || true
import glob, importlib.metadata, importlib.util, os, sys
if importlib.metadata.version('mmcv') == sys.argv[1]:
    spec = importlib.util.find_spec('mmcv')
    print(next(iter(glob.glob(os.path.join(os.path.dirname(spec.origin), '_ext*.so'))), ''))
PY
}

links_cudart() { [[ "$(readelf -d "$1")" == *"(NEEDED)"*"[libcudart."* ]]; }

# "cuda" where the installed mmcv's ops link the CUDA runtime, "cpu" where they do not, ""
# where mmcv is missing.
mmcv_kind() {
  local ext
  ext=$(mmcv_ext)
  if [ -z "$ext" ]; then echo ""
  elif links_cudart "$ext"; then echo cuda
  else echo cpu; fi
}

# The compute capabilities of the visible GPUs, e.g. "9.0" (nothing without one).
visible_gpu_archs() {
  "$py" -c 'import torch
if torch.cuda.is_available():
    print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})))' 2>/dev/null || true
}

# Which mmcv this set-up wants: "cpu", or "cuda ARCHS" with the architectures a build would
# be for. Needs $gpus (visible_gpu_archs). A CUDA build runs the CPU ops too: one already
# installed stays where no GPU is visible.
wanted_build() {
  if [ "$want_cuda" = 1 ] || [ -n "$gpus" ] || [ "$(mmcv_kind)" = cuda ]; then
    echo "cuda ${TORCH_CUDA_ARCH_LIST:-${gpus:-$DEFAULT_CUDA_ARCHS}}"
  else
    echo cpu
  fi
}

stamp_archs() { sed -n 's/^mmcv=cuda archs=//p' "$stamp" 2>/dev/null || true; }

# Whether the installed mmcv serves: the kind wanted, and for CUDA the architectures of every
# visible GPU, or exactly those of an explicit TORCH_CUDA_ARCH_LIST.
installed_matches() {
  local kind built arch
  kind=$(mmcv_kind)
  [ "$kind" = "${1%% *}" ] || return 1
  [ "$kind" = cpu ] && return 0
  built=$(stamp_archs)
  if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then [ "$built" = "$TORCH_CUDA_ARCH_LIST" ]; return; fi
  [ -n "$built" ] || return 0  # built before the stamp recorded architectures
  for arch in $(arch_words "$gpus"); do
    runs_on "$built" "$arch" || return 1
  done
}

# Whether code built for the architectures $1 runs on a GPU of architecture $2: a binary for
# X.Y runs on X.Z with Z >= Y; PTX for X.Y on anything from X.Y on.
runs_on() {
  local built gpu=$2 major minor
  for built in $(arch_words "$1"); do
    major=${built%%.*} minor=${built#*.} minor=${minor%+PTX}
    if [ "$major" = "${gpu%%.*}" ] && [ "$minor" -le "${gpu#*.}" ]; then return 0; fi
    if [[ $built == *+PTX ]] && [ $((major * 10 + minor)) -le $((${gpu%%.*} * 10 + ${gpu#*.})) ]; then
      return 0
    fi
  done
  return 1
}
arch_words() { tr ';' ' ' <<<"$1"; }

# The final check: mmcv's ops are the kind wanted, and the CPU ops run. For CUDA, _ext links
# the CUDA runtime and holds the CUDA launchers of NMS, RoIAlign and sigmoid focal loss.
check_mmcv_ops() {
  local kind=$1 ext symbols missing=()
  ext=$(mmcv_ext)
  [ -n "$ext" ] || die "mmcv $MMCV_VERSION is not installed in .venv/"
  "$py" -c 'import torch; from mmcv.ops import nms
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1]
assert kept.tolist() == [0, 2], kept' || die "mmcv's CPU nms does not run (see above)"
  if [ "$kind" = cuda ]; then
    links_cudart "$ext" \
      || die "$ext does not link the CUDA runtime: mmcv was built without CUDA ops"
    symbols=$(nm -D --defined-only "$ext")
    for name in NMSCUDAKernelLauncher ROIAlignForwardCUDAKernelLauncher \
                SigmoidFocalLossForwardCUDAKernelLauncher; do
      grep -q "$name" <<<"$symbols" || missing+=("$name")
    done
    [ ${#missing[@]} = 0 ] || die "$ext lacks ${missing[*]}: mmcv's CUDA ops are incomplete"
    say "mmcv $MMCV_VERSION has CUDA ops (libcudart, NMS/RoIAlign/focal-loss CUDA launchers) for architectures ${2:-unknown}, and CPU ops"
  else
    say "mmcv $MMCV_VERSION has CPU ops only (no GPU visible; 'bash tools/setup_env.sh --cuda' builds CUDA ops)"
  fi
}

if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$fingerprint" ] && [ -x "$py" ]; then
  gpus=$(visible_gpu_archs)
  want=$(wanted_build)
  if installed_matches "$want" && check_imports \
      && check_mmcv_ops "${want%% *}" "$(stamp_archs)" >/dev/null; then
    exit 0
  fi
fi

# The machine's pip configuration points at a folder holding a CPU-only torch wheel that pip
# prefers, and no torchvision exists for it. Ignore that configuration: take everything from
# the package registry so that torch and torchvision are a matching pair.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL || true
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$py" ]; then
  say "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$py" -m pip install --progress-bar off "${CONSTRAINTS[@]}")
site_packages=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# setuptools: torch 2.13 needs >= 77.0.3; mmcv's build and mmengine's `mmdet::` config lookup
# import pkg_resources, which setuptools 81 removed. ninja compiles mmcv's files in parallel.
"${pip[@]}" "setuptools>=77.0.3,<81" wheel ninja
"${pip[@]}" "${TORCH_PINS[@]}"
"${pip[@]}" -r requirements/runtime.txt -r requirements/tests.txt "${TORCH_PINS[@]}"

# A CUDA toolkit for the build: one installed on the machine if it has nvcc of torch's CUDA
# version and the headers torch's extensions include, else nvcc, headers and runtime from the
# package registry into .venv/ (nvidia/cuXX/).
use_cuda_toolkit() {
  local version candidate nvcc release
  version=$("$py" -c 'import torch; print(torch.version.cuda or "")')
  [ -n "$version" ] || die "this torch ($("$py" -c 'import torch; print(torch.__version__)')) has no CUDA; CUDA ops need torch's CUDA build"
  for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
      "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")" /usr/local/cuda; do
    [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] || continue
    release=$("$candidate/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    if [ "$release" != "$version" ]; then
      say "not using the CUDA toolkit in $candidate: its nvcc is ${release:-unknown}, torch is built with CUDA $version"
    elif [ ! -f "$candidate/include/cusparse.h" ] || [ ! -f "$candidate/include/cuda_runtime.h" ]; then
      say "not using the CUDA toolkit in $candidate: it lacks the headers torch's extensions include (cusparse.h, cuda_runtime.h)"
    else
      say "using the CUDA $version toolkit in $candidate"
      export CUDA_HOME=$candidate
      return
    fi
  done
  local major=${version%%.*}
  say "installing nvcc and the headers of CUDA $version from the package registry into .venv/"
  "${pip[@]}" "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-crt==$version.*" \
    "nvidia-nvvm==$version.*" "nvidia-cuda-cccl==$version.*" "nvidia-cuda-runtime==$version.*"
  local home="$site_packages/nvidia/cu$major"
  [ -x "$home/bin/nvcc" ] || die "the registry's nvcc is not at $home/bin/nvcc"
  # The linker looks for libcudart.so; the runtime package has only libcudart.so.$major.
  ln -sf "libcudart.so.$major" "$home/lib/libcudart.so"
  export CUDA_HOME=$home CUDA_INC_PATH=$home/include
  export PATH="$home/bin:$PATH"
}

gpus=$(visible_gpu_archs)
want=$(wanted_build)
kind=${want%% *}
if ! installed_matches "$want"; then
  cores=${MAX_JOBS:-$(nproc)}
  build_env=(MMCV_WITH_OPS=1 MAX_JOBS="$cores" FORCE_CUDA=0 PATH="$venv/bin:$PATH")
  label=cpu archs=
  if [ "$kind" = cuda ]; then
    archs=${want#cuda }
    use_cuda_toolkit
    n=$(arch_words "$archs" | wc -w)
    minutes=$(( (CPU_MINUTES_BASE + CPU_MINUTES_PER_ARCH * n) / cores + 1 ))
    say "building mmcv $MMCV_VERSION with CUDA ops for $n architecture(s) '$archs': about $minutes minutes with $cores parallel jobs (about $CPU_MINUTES_PER_ARCH CPU-minutes per architecture; TORCH_CUDA_ARCH_LIST picks fewer)"
    build_env=(MMCV_WITH_OPS=1 MAX_JOBS="$cores" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs"
               CUDA_HOME="$CUDA_HOME" CUDA_INC_PATH="${CUDA_INC_PATH:-}" PATH="$venv/bin:$PATH")
    label="cuda-${archs//;/-}"
  else
    say "building mmcv $MMCV_VERSION with CPU ops (about $(( CPU_MINUTES_BASE / cores + 1 )) minutes with $cores parallel jobs)"
  fi
  # pip's own wheel cache keys the built wheel on mmcv's source alone, so a CPU build would
  # be reused for CUDA: keep each kind, torch and Python in its own folder instead.
  tag=$("$py" -c 'import sys, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}")')
  cache=$("$py" -m pip cache dir 2>/dev/null || true)
  wheels=${cache:-$(mktemp -d)}/mmconvmlp-mmcv/$MMCV_VERSION-$tag-${label//+/_}
  if ! ls "$wheels"/mmcv-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheels"
    env "${build_env[@]}" "$py" -m pip wheel --no-deps --no-build-isolation --no-cache-dir \
      --progress-bar off -w "$wheels" "mmcv==$MMCV_VERSION"
  else
    say "reusing the mmcv wheel built before in $wheels"
  fi
  "$py" -m pip uninstall -y mmcv >/dev/null 2>&1 || true
  "${pip[@]}" "$wheels"/mmcv-*.whl
elif [ "$kind" = cuda ]; then
  archs=$(stamp_archs)
else
  archs=
fi
"${pip[@]}" --no-deps --no-build-isolation -e .

check_imports
check_mmcv_ops "$kind" "$archs"
printf '%s\n%s\n' "$fingerprint" "mmcv=$kind${archs:+ archs=$archs}" > "$stamp"
say ".venv is ready"
