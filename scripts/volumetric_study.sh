#!/bin/bash
# The volumetric-adapter study (docs/results.md, "A volumetric adapter"): the 2D model and 3DSAM-adapter's slabs,
# fine-tuned with the same budget on the same BraTS slabs (48 steps of 5 slices; the D = 3 row 80 steps of 3), then
# both run on the held-out patients (pat0004: test, pat0006: validation, neither trained on) with the volume
# session's propagation, protocols (a) 3D box and (b) one 2D box.
#   bash scripts/volumetric_study.sh OUT_DIR [train|evaluate|table|all] [NAMES...]
# NAMES (default: every one): r2d (the 2D model), rD5, rD1, rD5half, rD3 (adapters), start (the untrained warm start).
set -euo pipefail
out=${1:?usage: volumetric_study.sh OUT_DIR [train|evaluate|table|all] [NAMES...]}
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
declare -A train_options=(
  [r2d]="--volumetric_adapter false" [rD5]="" [rD1]="--slab_depth 1 --data_slab_depth 5"
  [rD5half]="--volumetric_blocks last_half" [rD3]="--slab_depth 3 --epoch_samples 80"
)
declare -A model_options=(
  [start]="--weights all_modalities --load_pretrain False" [r2d]="" [rD5]="--volumetric_adapter true"
  [rD1]="--volumetric_adapter true --slab_depth 1" [rD5half]="--volumetric_adapter true --volumetric_blocks last_half"
  [rD3]="--volumetric_adapter true --slab_depth 3"
)
shift $(( $# < 2 ? $# : 2 ))
names=("$@")
if [[ $stage == train || $stage == all ]]; then
  for name in "${names[@]:-r2d rD5 rD1 rD5half rD3}"; do
    for one in $name; do train "$one" ${train_options[$one]}; done
  done
fi
if [[ $stage == evaluate || $stage == all ]]; then
  for name in "${names[@]:-start r2d rD5 rD1 rD5half rD3}"; do
    for one in $name; do
      checkpoint=()
      [[ $one != start ]] && checkpoint=(--ckpt_file "$out/$one/models/model.pt")
      evaluate "$one" ${model_options[$one]} "${checkpoint[@]}"
    done
  done
fi
if [[ $stage == table || $stage == all || ( $stage == evaluate && ${#names[@]} -eq 0 ) ]]; then
  "$python" scripts/compare_volume_models.py --baseline 2D "start=$out/start/volumes/volumes.csv" \
    "2D=$out/r2d/volumes/volumes.csv" "adapter D=5=$out/rD5/volumes/volumes.csv" "adapter D=1=$out/rD1/volumes/volumes.csv" \
    "adapter D=3=$out/rD3/volumes/volumes.csv" "adapter D=5, last half=$out/rD5half/volumes/volumes.csv" | tee "$out/table.md"
fi
