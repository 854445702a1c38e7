#!/usr/bin/env bash
# The all-modality study of docs/results.md ("Every modality"): each row fine-tunes the lite_medsam warm start
# with the same budget (one epoch of EPOCH_SAMPLES items, batch 2, seed 123; the prompt rows on the balanced sampler) and is scored per modality on the
# test split of bundle/datalists/modalities.json.
#   bash scripts/modality_study.sh OUT_DIR [ROW ...]      (default: every row; OUT_DIR/<row>.csv per row)
#   python scripts/evaluate_modalities.py --table OUT_DIR/*.csv --baseline lite_medsam_reference
set -euo pipefail
out=${1:?usage: modality_study.sh OUT_DIR [ROW ...]}
shift
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(reference warm_start polyps_only proportional balanced modality content all_three proportional_without_microscopy)
python=${PYTHON:-python}
samples=${EPOCH_SAMPLES:-120}
base="['bundle/configs/train.yaml','bundle/configs/train_modalities.yaml']"
mkdir -p "$out"

train() {  # train ROW [bundle options...]
  local row=$1
  shift
  /usr/bin/time -v "$python" -m monai.bundle run training --max_epochs 1 --val_samples 24 --epoch_samples "$samples" \
    --ckpt_dir "$out/$row/models" --output_dir "$out/$row/eval" "$@" > "$out/$row.train.log" 2>&1
}
evaluate() {  # evaluate ROW [evaluate_modalities options...]
  local row=$1
  shift
  "$python" scripts/evaluate_modalities.py --row "$row" --output "$out/$row.csv" "$@" > "$out/$row.eval.log" 2>&1
}

for row in "${rows[@]}"; do
  echo "$(date +%T) $row"
  case $row in
    reference) "$python" scripts/evaluate_modalities.py --reference --output "$out/reference.csv" > "$out/reference.eval.log" 2>&1 ;;
    warm_start) evaluate warm_start ;;
    polyps_only)
      /usr/bin/time -v "$python" -m monai.bundle run training --config_file bundle/configs/train.yaml --max_epochs 1 \
        --dataset_dir ../shared/data/kvasir_sessile --split_file ../shared/data/splits/kvasir_sessile_split.json \
        --ckpt_dir "$out/$row/models" --output_dir "$out/$row/eval" > "$out/$row.train.log" 2>&1
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" ;;
    proportional) train "$row" --config_file "$base" --modality_temperature 0.0
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" ;;
    balanced) train "$row" --config_file "$base" --modality_temperature 1.0
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" ;;
    modality) train "$row" --config_file "$base" --modality_temperature 1.0 --modality_prompt true
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" --modality-prompt ;;
    content) train "$row" --config_file "$base" --modality_temperature 1.0 --content_prompt true
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" --content-prompt ;;
    all_three) train "$row" --config_file "$base" --modality_temperature 1.0 --modality_prompt true --content_prompt true
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" --modality-prompt --content-prompt ;;
    all_three_without_microscopy) train "$row" --config_file "$base" --modality_temperature 1.0 --modality_prompt true --content_prompt true \
        --exclude_modalities "['microscopy']"
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" --modality-prompt --content-prompt ;;
    proportional_without_microscopy) train "$row" --config_file "$base" --modality_temperature 0.0 \
        --exclude_modalities "['microscopy']"
      evaluate "$row" --checkpoint "$out/$row/models/model.pt" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
echo "$(date +%T) done"
