#!/usr/bin/env bash
# Builds the environment in .venv/ at the repository root: torch + torchvision, mmcv 2.1.0 with
# its compiled ops, mmengine, mmdet, mmsegmentation, timm and mmconvmlp itself (editable).
# Every package, dependencies included, comes at the version in requirements/constraints.txt:
# the stack the test suite passed with. Safe to run again: when .venv/ is already complete it
# only re-checks the imports (seconds).
#   bash tools/setup_env.sh                 build or check .venv/
#   bash tools/setup_env.sh --freeze        rewrite requirements/constraints.txt from .venv/
#                                           (after the suite passed on a changed stack)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

TORCH_PINS=(torch==2.13.0 torchvision==0.28.0)
MMCV_PIN=mmcv==2.1.0
CONSTRAINTS=(-c requirements/constraints.txt)
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.mmconvmlp-setup"
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
  echo "setup_env: wrote requirements/constraints.txt ($(grep -c '==' requirements/constraints.txt) packages)"
  exit 0
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && check_imports; then
  exit 0
fi

# The machine's pip configuration points at a folder holding a CPU-only torch wheel that pip
# prefers, and no torchvision exists for it. Ignore that configuration: take everything from
# the package registry so that torch and torchvision are a matching pair.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL || true
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$py" ]; then
  echo "setup_env: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$py" -m pip install --progress-bar off "${CONSTRAINTS[@]}")

# setuptools: torch 2.13 needs >= 77.0.3; mmcv's build and mmengine's `mmdet::` config lookup
# import pkg_resources, which setuptools 81 removed.
"${pip[@]}" "setuptools>=77.0.3,<81" wheel
"${pip[@]}" "${TORCH_PINS[@]}"
"${pip[@]}" -r requirements/runtime.txt -r requirements/tests.txt "${TORCH_PINS[@]}"

if ! "$py" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '${MMCV_PIN#mmcv==}'" 2>/dev/null; then
  echo "setup_env: building $MMCV_PIN with its ops (about 10 minutes on 2 cores, cached by pip afterwards)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${pip[@]}" --no-build-isolation "$MMCV_PIN"
fi
"${pip[@]}" --no-deps --no-build-isolation -e .

check_imports
echo "$fingerprint" > "$stamp"
echo "setup_env: .venv is ready"
