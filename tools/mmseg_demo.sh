#!/usr/bin/env bash
# The mmsegmentation plug-in on the embedded default: configs/mmseg/segmenter_linear_flexivit-mu_1xb16-1k_scenes-96x96.py
# trained with mmseg's own tools/train.py (a random patch size per iteration), then tested with its tools/test.py at
# every patch size (model.backbone.test_patch_size). Needs the mmseg stack, the main job's backbone and the scenes:
# it makes what is missing first (the main job ~8 minutes on 2 cores, the scenes ~15 s, the mmseg stack ~12 minutes
# once), so it runs from a fresh clone:
#   bash tools/mmseg_demo.sh            (about 6 minutes on 2 CPU cores once those exist)
source "$(dirname "$0")/demo_env.sh"  # repository root, $py, the main job's backbone (trained when missing)
bash tools/install_mmseg.sh
if [ ! -f data/scenes/scenes.json ]; then
  $py -m tools.make_scenes --out data/scenes --num-train 2000 --num-val 200 --seed 0
fi
mim=$($py -c "import mmseg, os; print(os.path.join(os.path.dirname(mmseg.__file__), '.mim', 'tools'))")
config=configs/mmseg/segmenter_linear_flexivit-mu_1xb16-1k_scenes-96x96.py
work=${1:-runs/mmseg_scenes}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# mmengine 0.10.7 resumes its own checkpoints with a plain torch.load, which torch >= 2.6 refuses otherwise; only
# checkpoints this run wrote are loaded that way.
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
[ -f "$work/iter_1000.pth" ] || $py "$mim/train.py" "$config" --work-dir "$work" --resume
echo "| test patch size | aAcc | mIoU | mAcc |" > "$work/sweep.md"
echo "|---:|---:|---:|---:|" >> "$work/sweep.md"
for patch in 16 12 10 8 6 4; do
  $py "$mim/test.py" "$config" "$work/iter_1000.pth" --work-dir "$work/test_p$patch" \
    --cfg-options model.backbone.test_patch_size=$patch > "$work/test_p$patch.log" 2>&1
  line=$(grep -o "aAcc: [0-9.]*  mIoU: [0-9.]*  mAcc: [0-9.]*" "$work/test_p$patch.log" | tail -1)
  echo "$line" | awk -v p=$patch '{print "| " p " | " $2 " | " $4 " | " $6 " |"}' >> "$work/sweep.md"
done
cat "$work/sweep.md"
