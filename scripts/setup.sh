#!/usr/bin/env bash
# Set up weit on a fresh machine: a venv in .venv, the pinned torch for this platform, weit itself
# (editable, with dev tools), and Fashion-MNIST. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${WEIT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel

# The torch pin lives here, not in pyproject: timm needs torchvision, and on x86_64 torchvision 0.29.1
# only imports beside torch 2.14.1 (the CPU-only torch 2.13.0 wheel breaks torchvision's _C.so).
case "$(uname -m)" in
  x86_64) TORCH_PINS="torch==2.14.1 torchvision==0.29.1" ;;
  *)      TORCH_PINS="torch torchvision" ;;
esac
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_PINS"
  $PIP install -q $TORCH_PINS
fi
echo "[setup] installing weit and its dependencies"
$PIP install -q -e ".[dev]"

# Fashion-MNIST: the Debian package where we can, else say where the files go. Found = the same search
# weit itself does (weit_core.data.find_fashion_mnist: $WEIT_DATA, then the Debian package's folder).
have_fmnist() { "$VENV/bin/python" -c "from weit_core.data import find_fashion_mnist as f; print(f())" 2>/dev/null; }
if where=$(have_fmnist); then
  echo "[setup] Fashion-MNIST found in $where"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
         || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }; then
    echo "[setup] error: apt-get could not install dataset-fashion-mnist; put the four official files" >&2
    echo "        (train-images-idx3-ubyte.gz, ...) in a folder and export WEIT_DATA=<folder>" >&2
    exit 1
  fi
  echo "[setup] Fashion-MNIST installed in $(have_fmnist)"
else
  echo "[setup] Fashion-MNIST not found. Either run 'sudo apt-get install dataset-fashion-mnist', or put the"
  echo "        four official files (train-images-idx3-ubyte.gz, ...) in a folder and export WEIT_DATA=<folder>."
fi
echo "[setup] done in ${SECONDS}s: run '$VENV/bin/weit quickstart', or activate with 'source $VENV/bin/activate'"
