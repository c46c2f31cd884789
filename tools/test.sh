#!/usr/bin/env bash
# The project's test command: sets up what it needs (tools/setup.sh), then runs the fast test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k pi_resize` or `bash tools/test.sh -m slow`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || exit 1
.venv/bin/python -m pytest -q "$@"
status=$?
if [ "$status" = 5 ]; then
  echo "test.sh: pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
