#!/usr/bin/env bash
# Sets up .venv/ if needed (tools/setup_env.sh), then runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k backbone`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest tests "$@"
