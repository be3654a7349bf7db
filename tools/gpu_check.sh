#!/usr/bin/env bash
# One check of the CUDA paths on a GPU machine, everything in one Markdown report.
#   bash tools/gpu_check.sh --prepare          here, with the package registry and .venv/:
#                                              fills build/gpu-check/ (wheels for Python 3.12,
#                                              OpenCV, mmcv's source: under 64 MiB)
#   bash tools/gpu_check.sh [REPORT]           on the GPU machine (python3 with torch+CUDA,
#                                              nvcc, no registry; build/gpu-check/ carried):
#                                              builds mmcv's ops for the GPU's architecture
#                                              with all cores, then checks; REPORT defaults to
#                                              $OUT/gpu_check.md, or ./gpu_check.md
#   bash tools/gpu_check.sh --dry-run [REPORT] here, on the CPU with .venv/: every check but
#                                              the build, small sizes
# The checks (tools/gpu_check/checks.py): the backbone on CUDA against the CPU (float32 with
# TF32 off within 1e-4, and under autocast); mmcv's _ext (CUDA runtime, the NMS, RoIAlign and
# focal-loss launchers, CUDA nms against CPU nms); one --amp training step and one validation
# step of the RetinaNet, Mask R-CNN and Semantic FPN shapes configs; training img/s and peak
# memory, then inference (tools/analysis/benchmark.py), of RetinaNet-ConvMLP-S and -R50.
# Every stage has a time limit within GPU_CHECK_SECONDS (default 340; 4 times that in a dry
# run) in all; a second run on the same machine reuses the installed packages and the built
# mmcv (build/gpu-check-work/).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bundle=$root/build/gpu-check       # what --prepare fills and the GPU machine gets
work=$root/build/gpu-check-work    # what the GPU machine makes: kept there for a second run
site=$work/site
MMCV_VERSION=2.1.0
# The GPU machines' Python, and what they lack of the stack (torch, timm, numpy, pandas,
# matplotlib are there). OpenCV travels unpacked in a tar.xz: its wheel alone is 61 MB.
PY_VERSION=3.12
WHEELS=(mmengine mmdet mmsegmentation addict yapf platformdirs termcolor rich markdown-it-py
        mdurl pygments pycocotools shapely six terminaltables tqdm prettytable wcwidth ftfy
        regex packaging psutil pyyaml ninja setuptools wheel)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
SPEED_CONFIGS="configs/detection/retinanet_convmlp_s_coco.py mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"

say() { echo "gpu_check: $*" >&2; }

prepare() {
  local py=$root/.venv/bin/python platforms=() tmp version
  [ -x "$py" ] || { say "--prepare needs .venv/ (bash tools/setup_env.sh)"; exit 1; }
  for p in "${PLATFORMS[@]}"; do platforms+=(--platform "$p"); done
  rm -rf "$bundle" && mkdir -p "$bundle/wheels"
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    "${platforms[@]}" -c requirements/constraints.txt -d "$bundle/wheels" "${WHEELS[@]}" || exit 1
  # mmcv's source: its metadata step imports torch, hence .venv's pip without isolation.
  "$py" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d "$bundle" "mmcv==$MMCV_VERSION" || exit 1
  version=$(sed -n 's/^opencv-python==//p' requirements/constraints.txt)
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    "${platforms[@]}" -d "$tmp" "opencv-python-headless==$version" || exit 1
  mkdir "$tmp/unpacked"
  "$py" -m zipfile -e "$tmp"/opencv_python_headless-*.whl "$tmp/unpacked"
  say "compressing OpenCV (about 2 CPU-minutes)"
  tar -C "$tmp/unpacked" -cf - . | xz -T0 -6 > "$bundle/opencv.tar.xz"
  rm -rf "$tmp"
  local bytes
  bytes=$(du -sb "$bundle" | cut -f1)
  say "build/gpu-check/ holds $((bytes / 1048576)) MiB: carry it with the working tree"
  [ "$bytes" -lt $((62 * 1048576)) ] || { say "that is over the 62 MiB allowed"; exit 1; }
}

# --- on the GPU machine ---------------------------------------------------------------

start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
report_line() { printf '%s\n' "$*" >> "$report"; }

# A stage: run "$@" with at most min($1, time left) seconds; its output goes to the log.
stage() {
  local limit=$(( $1 * slow )) name=$2
  shift 2
  local remaining
  remaining=$(left)
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt 10 ]; then
    report_line "**$name: not run**, the time limit of ${budget} s was spent." && report_line ""
    return 1
  fi
  say "$name (at most ${limit} s)"
  local t0
  t0=$(date +%s)
  # timeout stops the command's whole process group; a function runs in a child bash.
  declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  [ $rc = 124 ] && { report_line "**$name: stopped after ${limit} s**" && report_line ""; }
  say "$name: exit $rc after $(( $(date +%s) - t0 )) s"
  return $rc
}

install_bundle() {
  [ -f "$site/.installed" ] && return 0
  [ -d "$bundle/wheels" ] || { say "build/gpu-check/ is missing: run --prepare where a registry is, and carry it"; return 1; }
  rm -rf "$site" && mkdir -p "$site"
  "$python" - "$bundle/wheels" "$site" <<'PY' || return 1
import glob, os, sys, zipfile
wheels, site = sys.argv[1:]
for wheel in sorted(glob.glob(os.path.join(wheels, '*.whl'))):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
PY
  tar -C "$site" -xJf "$bundle/opencv.tar.xz" || return 1
  chmod +x "$site"/ninja-*.data/scripts/ninja
  # mmseg's transforms import scipy.ndimage at import time; these configs use none of it.
  if ! "$python" -c 'import scipy.ndimage' 2>/dev/null; then
    mkdir -p "$site/scipy"
    echo '"""Stand-in: this machine has no scipy (tools/gpu_check.sh)."""' > "$site/scipy/__init__.py"
    printf 'def gaussian_filter(*args, **kwargs):\n    raise ImportError("scipy is not installed")\n' \
      > "$site/scipy/ndimage.py"
    report_line "Note: no scipy on this machine; a stand-in lets mmseg import (unused here)."
    report_line ""
  fi
  touch "$site/.installed"
}

# A CUDA toolkit for the build: nvcc of torch's CUDA version; headers it lacks (cusparse.h)
# come from torch's nvidia/cuXX/include, and a libcudart.so for the linker from there too.
find_toolkit() {
  local version candidate release nvidia hint=${CUDA_HOME:-}
  version=$("$python" -c 'import torch; print(torch.version.cuda or "")')
  nvidia=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')
  nvidia=$(ls -d "$nvidia"/cu* 2>/dev/null | head -n1)
  CUDA_HOME=
  for candidate in "$hint" /usr/local/cuda /usr/local/cuda-"$version" \
      "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
    [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ] || continue
    release=$("$candidate/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    [ "$release" = "$version" ] && { CUDA_HOME=$candidate; break; }
  done
  [ -n "$CUDA_HOME" ] || { say "no nvcc $version with cuda_runtime.h found"; return 1; }
  CUDA_INC_PATH=
  if [ ! -f "$CUDA_HOME/include/cusparse.h" ] && [ -f "$nvidia/include/cusparse.h" ]; then
    CUDA_INC_PATH=$nvidia/include
  fi
  LINK_DIR=$work/link
  mkdir -p "$LINK_DIR"
  if [ ! -e "$CUDA_HOME/lib64/libcudart.so" ] && [ -n "$nvidia" ]; then
    ln -sf "$(ls "$nvidia"/lib/libcudart.so.* | head -n1)" "$LINK_DIR/libcudart.so"
  fi
  export CUDA_HOME CUDA_INC_PATH LINK_DIR
  report_line "- CUDA toolkit: $CUDA_HOME (nvcc $version)${CUDA_INC_PATH:+; headers also from $CUDA_INC_PATH}"
}

build_mmcv() {
  local t0
  t0=$(date +%s)
  rm -rf "$work/dist"
  (cd "$src" && env MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
     MAX_JOBS="$(nproc)" LIBRARY_PATH="$LINK_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}" \
     PATH="$(echo "$site"/ninja-*.data/scripts):$PATH" \
     "$python" setup.py -q bdist_wheel -d "$work/dist") || return 1
  "$python" -m zipfile -e "$work"/dist/mmcv-*.whl "$site" || return 1
  echo "$(( $(date +%s) - t0 ))" > "$work/build_seconds"
}

# mmcv's _ext: the CUDA runtime, the three launchers, and CUDA nms against CPU nms.
check_ext() {
  local ext
  ext=$("$python" -c 'import glob, os, mmcv; print(glob.glob(os.path.join(os.path.dirname(mmcv.__file__), "_ext*.so"))[0])') || return 1
  report_line "## mmcv $MMCV_VERSION's ops"
  report_line ""
  report_line "- linked: $(readelf -d "$ext" | sed -n 's/.*NEEDED.*\[\(libcudart[^]]*\)\]/\1/p')"
  local symbols name ok=0
  symbols=$(nm -D --defined-only "$ext")
  for name in NMSCUDAKernelLauncher ROIAlignForwardCUDAKernelLauncher \
              SigmoidFocalLossForwardCUDAKernelLauncher; do
    if grep -q "$name" <<<"$symbols"; then report_line "- $name: present"
    elif [ "$device" = cpu ]; then report_line "- $name: absent (a CPU build; dry run)"
    else report_line "- $name: **MISSING**"; ok=1; fi
  done
  "$python" - "$device" >> "$report" <<'PY' || ok=1
import sys, torch
from mmcv.ops import get_compiling_cuda_version, nms, roi_align
device = sys.argv[1]
gen = torch.Generator().manual_seed(0)
xy = torch.rand(500, 2, generator=gen) * 200
boxes = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=gen) * 40], 1)
scores = torch.rand(500, generator=gen)
kept_cpu = nms(boxes, scores, 0.5)[1]
kept_dev = nms(boxes.to(device), scores.to(device), 0.5)[1].cpu()
feature = torch.randn(2, 8, 32, 32, generator=gen)
rois = torch.tensor([[0, 1., 1., 20., 25.], [1, 5., 3., 30., 31.]])
pooled_cpu = roi_align(feature, rois, (7, 7), 1.0, 2, 'avg', True)
pooled_dev = roi_align(feature.to(device), rois.to(device), (7, 7), 1.0, 2, 'avg', True).cpu()
same = torch.equal(kept_cpu, kept_dev)
close = torch.allclose(pooled_cpu, pooled_dev, atol=1e-5)
print(f'- compiled with CUDA {get_compiling_cuda_version()}, torch {torch.__version__}')
print(f'- nms of 500 boxes on {device}: {len(kept_dev)} kept, '
      f'{"the same as" if same else "**DIFFERENT from**"} the CPU ({len(kept_cpu)})')
print(f'- roi_align on {device} against the CPU: max difference '
      f'{(pooled_cpu - pooled_dev).abs().max():.1e} {"ok" if close else "**FAIL**"}')
print()
sys.exit(0 if same and close else 1)
PY
  return $ok
}

inference_speed() {
  # shellcheck disable=SC2086
  "$python" tools/analysis/benchmark.py $SPEED_CONFIGS --device "$device" \
    --shape $shape --repeats "$repeats" --precision auto float32 \
    | awk '/^\|/ && !table { print ""; table = 1 } /^(\||Inference of|device:)/' \
    | tee -a "$report"
}

main() {
  local mode=gpu
  case "${1:-}" in
    --prepare) prepare; exit $? ;;
    --dry-run) mode=cpu; shift ;;
    -*) say "unknown option '$1' (--prepare, --dry-run)"; exit 2 ;;
  esac
  report=${1:-${OUT:-.}/gpu_check.md}
  log=${report%.md}.log
  : > "$report"; : > "$log"
  failed=()
  export -f say report_line install_bundle build_mmcv check_ext inference_speed
  export report log site bundle work MMCV_VERSION src
  if [ "$mode" = cpu ]; then
    python=$root/.venv/bin/python device=cpu slow=4
    export PYTHONPATH=$root
    shape="128 160" iterations=1 repeats=1
  else
    python=${PYTHON:-python3} device=cuda slow=1
    src=$work/src/mmcv-$MMCV_VERSION
    export PYTHONPATH=$site:$root:$src
    shape="800 1216" iterations=10 repeats=10
  fi
  budget=${GPU_CHECK_SECONDS:-$(( 340 * slow ))}
  export python device shape repeats SPEED_CONFIGS
  report_line "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  report_line ""
  report_line "- machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1 || echo 'no GPU (dry run)'); $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
  report_line "- python: $("$python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)')"
  if [ "$mode" = gpu ]; then
    stage 60 "install the carried packages" install_bundle || { say "see $log"; exit 1; }
    arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
      || { say "torch sees no GPU"; exit 1; }
    export arch
    report_line "- GPU architecture: $arch"
    if [ -f "$work/build_seconds" ] && ls "$site"/mmcv/_ext*.so >/dev/null 2>&1; then
      report_line "- mmcv: built before on this machine in $(cat "$work/build_seconds") s"
      build_pid=
    else
      find_toolkit || { say "see $log"; exit 1; }
      # mmcv's Python code (no ops yet) serves the backbone check while the ops build.
      rm -rf "$work/src" && mkdir -p "$work/src"
      tar -C "$work/src" -xzf "$bundle/mmcv-$MMCV_VERSION.tar.gz" || exit 1
      stage 280 "build mmcv for $arch with $(nproc) jobs" build_mmcv &
      build_pid=$!
    fi
  else
    find_toolkit || failed+=(toolkit)
    report_line "- mmcv: .venv/'s ($("$python" -c 'from mmcv.ops import get_compiling_cuda_version as v; print(v())') CUDA); no build in a dry run"
  fi
  report_line ""
  stage 60 "backbone" "$python" tools/gpu_check/checks.py backbone "$report" --device "$device" \
    || failed+=(backbone)
  if [ -n "${build_pid:-}" ]; then
    wait "$build_pid" || { failed+=("mmcv build"); report_line "**mmcv build failed**: the end of $log:"; report_line '```'; tail -n 30 "$log" >> "$report"; report_line '```'; say "${failed[*]} failed; see $report"; exit 1; }
    report_line "- mmcv: built in $(cat "$work/build_seconds") s with $(nproc) jobs" && report_line ""
  fi
  stage 30 "mmcv's _ext" check_ext || failed+=(_ext)
  stage 120 "training and validation steps" "$python" tools/gpu_check/checks.py steps "$report" \
    --device "$device" || failed+=(steps)
  stage 60 "training speed" "$python" tools/gpu_check/checks.py train-speed "$report" \
    --device "$device" --shape $shape --iterations "$iterations" || failed+=(train-speed)
  report_line "## Inference speed (tools/analysis/benchmark.py)"
  report_line ""
  stage 60 "inference speed" inference_speed || failed+=(inference)
  report_line ""
  report_line "Took $(( $(date +%s) - start )) s. ${failed[*]:+Failed: ${failed[*]}.}"
  say "report: $report (output: $log)${failed[*]:+; failed: ${failed[*]}}"
  [ ${#failed[@]} = 0 ]
}

main "$@"
