#!/usr/bin/env bash
# Beauty to convergence on one GPU within about 9 minutes: PRORec (Stage I, then Stage II) and SASRec-CE
# under the runner's protocol with early stopping and wall-clock budgets, then the GPU beam-search benchmark.
#
#   python benchmarks/gpu/prepare.py --dataset Amazon_Beauty   # here: wheels, data, text embeddings -> .carry/
#   bash benchmarks/gpu/converged.sh                           # there, carrying .carry; writes $OUT (or results/gpu)
#   bash benchmarks/gpu/converged.sh --quick                   # any CPU: ml-100k, tiny budgets, the same steps
#
# Budgets (seconds, environment variables): STAGE1_BUDGET (Stage I DIN, validated by full ranking after
# every epoch, stops after 3 epochs without gain), BUDGET (each model's Stage II training + validation; no
# epoch starts after it; PROREC_BUDGET and SASREC_BUDGET set one model's), EPOCHS (cap). Stage II's early
# stopping: properties/overall.yaml. DECODE=0 skips the beam-search benchmark. A Stage-I output carried
# under saved/unicode/ with the same settings and data is reused (stage1.py's key hashes file contents).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
quick=0; [ "${1:-}" = "--quick" ] && quick=1
if [ $quick = 1 ]; then
  DATASET=${DATASET:-ml-100k}; STAGE1_BUDGET=${STAGE1_BUDGET:-20}; BUDGET=${BUDGET:-20}; EPOCHS=${EPOCHS:-1}
  tmp=$(mktemp -d)  # Stage I output and checkpoints of a smoke run stay out of saved/
  extra=(--gpu_id= --MAX_ITEM_LIST_LENGTH=5 --user_inter_num_interval="[20,41)" --unicode_dir="$tmp/unicode"
         --checkpoint_dir="$tmp/saved")
  decode=(--quick --device cpu)
else
  DATASET=${DATASET:-Amazon_Beauty}; STAGE1_BUDGET=${STAGE1_BUDGET:-100}; BUDGET=${BUDGET:-150}; EPOCHS=${EPOCHS:-300}
  extra=()
  decode=(--device cuda --no-dual)
fi
if [ -d .carry/wheels ] && ! python3 -c "import recbole" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 - <<'PY' | tee "$OUT/environment.txt"
import numpy, pandas, recbole, sklearn, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, GPU {gpu}, numpy {numpy.__version__}, pandas {pandas.__version__}, "
      f"recbole {recbole.__version__}, scikit-learn {sklearn.__version__}")
PY
data=()
if [ -d ".carry/datasets/$DATASET" ]; then  # gzipped atomic files and precomputed text embeddings
  mkdir -p "/tmp/datasets/$DATASET"
  for f in ".carry/datasets/$DATASET"/*.gz; do gunzip -c "$f" > "/tmp/datasets/$DATASET/$(basename "${f%.gz}")"; done
  data=(--data_path=/tmp/datasets --semantic_embedding_file=".carry/$DATASET.semantic.npy")
fi
# Stage I's DIN is validated by full ranking: seconds on a GPU in large item chunks (RecBole's sampled
# 'uni100' validation cost 40 s an epoch there, in its CPU-side sampler; docs/runs/gpu_Amazon_Beauty.md)
[ $quick = 1 ] && chunk=128 || chunk=4096
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore  # RecBole 1.2.1 warns on every pandas call
train() {  # model, its budget: one runner call, its table appended to the results file
  local start; start=$(date +%s)
  python3 run_recbole_prorec.py --model="$1" --dataset="$DATASET" "${data[@]}" "${extra[@]}" \
    --show_progress=False --epochs="$EPOCHS" --train_time_budget="$2" \
    --stage1="{'epochs': 100, 'train_time_budget': $STAGE1_BUDGET, 'eval_step': 1, 'stopping_step': 3}" \
    --din_full_sort_chunk=$chunk \
    --results_file="$OUT/converged_$DATASET.md" > "$OUT/converged_$1.log" 2>&1 || {
    tail -n 40 "$OUT/converged_$1.log"; echo "the runner failed: see $OUT/converged_$1.log"; exit 1; }
  grep -E "Stage I:|epoch [0-9]+ (training|evaluating)|diagnostics|test result|^\|" "$OUT/converged_$1.log" || true
  echo "$1: $(( $(date +%s) - start )) s"
}
train PRORec "${PROREC_BUDGET:-$BUDGET}"
train SASRec-CE "${SASREC_BUDGET:-$BUDGET}"
[ "${DECODE:-1}" = 1 ] && python3 benchmarks/decode.py "${decode[@]}" --out "$OUT/decode.md" | tail -n 25
find log -name "*.log" -newer "$OUT/environment.txt" -exec cp {} "$OUT/" \;  # this run's logs only
