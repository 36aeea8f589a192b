#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test scgpt-rs:
#   - libhdf5-dev + pkg-config (the h5ad reader links HDF5)
#   - a Python venv at .venv with the independent readers the tests compare against
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
dpkg -s libhdf5-dev >/dev/null 2>&1 || need_apt+=(libhdf5-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
dpkg -s python3-venv >/dev/null 2>&1 || python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

if ! .venv/bin/python -c "import anndata, pyarrow, h5py, scipy, tensorboard, blake3" 2>/dev/null; then
  echo "setup: creating .venv with the Python test readers"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
fi
echo "setup: ok"
