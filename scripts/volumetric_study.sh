#!/bin/bash
# The volumetric-adapter study (docs/results.md, "A volumetric adapter"): the 2D model and 3DSAM-adapter's slabs,
# fine-tuned with the same budget on the same BraTS slabs (48 steps of 5 slices; the D = 3 row 80 steps of 3), then
# both run on the held-out patients (pat0004: test, pat0006: validation, neither trained on) with the volume
# session's propagation, protocols (a) 3D box and (b) one 2D box.
#   bash scripts/volumetric_study.sh OUT_DIR [train|evaluate|all]
set -euo pipefail
out=${1:?usage: volumetric_study.sh OUT_DIR [train|evaluate|all]}
stage=${2:-all}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
train() {  # NAME [bundle overrides]
  local name=$1; shift
  mkdir -p "$out/$name"
  /usr/bin/time -v "$python" -m monai.bundle run training \
    --config_file "['bundle/configs/train.yaml','bundle/configs/train_volume.yaml']" \
    --epoch_samples 48 --val_samples 16 --ckpt_dir "$out/$name/models" --output_dir "$out/$name/eval" "$@" \
    > "$out/$name/train.log" 2>&1
}
evaluate() {  # NAME [bundle overrides]
  local name=$1; shift
  mkdir -p "$out/$name"
  "$python" -m monai.bundle run --config_file \
    "['bundle/configs/train.yaml','bundle/configs/inference.yaml','bundle/configs/evaluate_volume.yaml']" \
    --cases "['brats_2013_pat0004_1','brats_2013_pat0006_1']" --protocols "['box3d','slice_box']" --reference False \
    --output_dir "$out/$name/volumes" "$@" > "$out/$name/evaluate.log" 2>&1
}
if [[ $stage == train || $stage == all ]]; then
  train r2d --volumetric_adapter false
  train rD5
  train rD1 --slab_depth 1 --data_slab_depth 5
  train rD5half --volumetric_blocks last_half
  train rD3 --slab_depth 3 --epoch_samples 80
fi
if [[ $stage == evaluate || $stage == all ]]; then
  evaluate start --weights all_modalities --load_pretrain False
  evaluate r2d --ckpt_file "$out/r2d/models/model.pt"
  evaluate rD5 --volumetric_adapter true --ckpt_file "$out/rD5/models/model.pt"
  evaluate rD1 --volumetric_adapter true --slab_depth 1 --ckpt_file "$out/rD1/models/model.pt"
  evaluate rD5half --volumetric_adapter true --volumetric_blocks last_half --ckpt_file "$out/rD5half/models/model.pt"
  evaluate rD3 --volumetric_adapter true --slab_depth 3 --ckpt_file "$out/rD3/models/model.pt"
  "$python" scripts/compare_volume_models.py --baseline 2D "start=$out/start/volumes/volumes.csv" \
    "2D=$out/r2d/volumes/volumes.csv" "adapter D=5=$out/rD5/volumes/volumes.csv" "adapter D=1=$out/rD1/volumes/volumes.csv" \
    "adapter D=3=$out/rD3/volumes/volumes.csv" "adapter D=5, last half=$out/rD5half/volumes/volumes.csv" | tee "$out/table.md"
fi
