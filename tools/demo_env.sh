# Sourced by the demo scripts: run from the repository root with the project's environment ($py), and train the
# main job's FlexiViT first when it is missing (the demos start from it; a fresh clone spends ~8 minutes there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
[ -x "$py" ] || bash tools/setup.sh
if ! ls runs/fashion_mnist/checkpoints/ckpt_*.pt >/dev/null 2>&1; then
  bash tools/main.sh
fi
