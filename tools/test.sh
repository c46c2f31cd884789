#!/usr/bin/env bash
# The project's test command: sets up what it needs (tools/setup.sh, then the optional mmsegmentation stack with
# tools/install_mmseg.sh, so that the mmseg plug-in's tests run), then runs the fast test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k pi_resize` or `bash tools/test.sh -m slow`.
# FLEXIVIT_SKIP_MMSEG=1 skips the mmseg install (its tests then skip, saying why); the first install builds mmcv
# from source (~12 minutes on 2 cores), later ones reuse the cached wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || exit 1
if [ "${FLEXIVIT_SKIP_MMSEG:-0}" != 1 ]; then
  bash tools/install_mmseg.sh || {
    echo "test.sh: installing the mmseg stack failed (see above); its plug-in tests will skip" >&2
  }
fi
.venv/bin/python -m pytest -q -rs "$@"
status=$?
if [ "$status" = 5 ]; then
  echo "test.sh: pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
