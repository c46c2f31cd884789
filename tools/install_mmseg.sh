#!/usr/bin/env bash
# Optional stack for the mmsegmentation plug-in: mmengine 0.10.7, mmcv 2.1.0 (built from source: no wheel exists for
# current torch) and mmsegmentation 1.2.2, installed into .venv. The mmcv build takes ~12 minutes on 2 cores once;
# the wheel is kept in $FLEXIVIT_WHEELS (default ~/.cache/flexivit/wheels) and reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if $py -c "import mmseg, mmcv.ops, mmengine" >/dev/null 2>&1; then
  echo "install_mmseg: already installed"; exit 0
fi
wheels=${FLEXIVIT_WHEELS:-$HOME/.cache/flexivit/wheels}
mkdir -p "$wheels"
# mmcv 2.1.0's setup.py needs pkg_resources (setuptools < 81) and must see the installed torch (no build isolation).
$py -m pip install -q "setuptools<81" wheel mmengine==0.10.7
if ! ls "$wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  src=$(mktemp -d)
  $py -m pip download -q --no-deps --no-build-isolation --no-binary :all: mmcv==2.1.0 -d "$src"
  tar xzf "$src"/mmcv-2.1.0.tar.gz -C "$src"
  # torch >= 2.6 headers need C++20; mmcv 2.1.0 asks for C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src"/mmcv-2.1.0/setup.py
  echo "install_mmseg: building mmcv 2.1.0 from source (about 12 minutes on 2 cores)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $py -m pip wheel -q --no-build-isolation --no-deps "$src"/mmcv-2.1.0 -w "$wheels"
  rm -rf "$src"
fi
$py -m pip install -q --no-deps "$wheels"/mmcv-2.1.0-*.whl
$py -m pip install -q mmsegmentation==1.2.2 "addict" "yapf" "prettytable" "termcolor" "rich" "opencv-python"
$py -c "import mmseg, mmcv, mmcv.ops; print('install_mmseg: mmseg', mmseg.__version__, 'mmcv', mmcv.__version__)"
