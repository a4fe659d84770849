#!/usr/bin/env bash
# ST2SI full fine-tuning on ml-100k: learning rate 5e-5, 1e-4 and 2e-4 crossed with the authors' random
# windows and `all`, six runs side by side on one GPU (float32 scores), then the best of them (by
# validation NDCG@10) under the 20-candidate protocol. Sized for one 10-minute call on an H100/H200:
#
#   bash benchmarks/gpu_recipe_study.sh [OUTPUT_DIR]      # default results/ml-100k-gpu-study
#
# Each run is an ordinary benchmark run (its own folder, record and report); a run cut short by the
# time limits below resumes from its checkpoint when the script is started again. The summary table
# goes to OUTPUT_DIR/README.md. The runs keep the defaults' 16 samples x 4 accumulation steps, so that
# six fit the GPU's memory together (one run at 64 x 1 grew to 69 GB on an H100). EPOCHS (default 8),
# TRAIN_LIMIT_S (default 400) and UNI19_LIMIT_S (default 150) bound the work; EXTRA passes settings
# to every run, e.g. for a CPU smoke run:
#   EPOCHS=1 EXTRA="--llm_path=tiny-random --MAX_ITEM_LIST_LENGTH=5" bash benchmarks/gpu_recipe_study.sh /tmp/study
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/ml-100k-gpu-study}
python=${PYTHON:-.venv/bin/python}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
common=(--dataset=ml-100k --models=ST2SI --st2si_stages=full --epochs="${EPOCHS:-8}" --stopping_step=3
        --keep_checkpoints "${extra[@]}")

for rate in 5e-5 1e-4 2e-4; do
  for window in random all; do
    name="lr$rate-$window"
    timeout "${TRAIN_LIMIT_S:-400}" "$python" -m recbole_st2si.benchmark "${common[@]}" --output_dir="$out/$name" \
      --learning_rate="$rate" --train_window="$window" > "$out/$name.log" 2>&1 &
  done
done
wait

best=$("$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
records = [(json.loads(path.read_text()), path.parts[-4]) for path in Path(sys.argv[1]).glob("*/ml-100k/runs/*.json")]
finished = [(record["best_valid_score"], name) for record, name in records if record.get("status") == "ok"]
print(max(finished)[1] if finished else "")
PY
)
if [ -n "$best" ]; then
  rate=${best#lr}; rate=${rate%-*}; window=${best##*-}
  timeout "${UNI19_LIMIT_S:-150}" "$python" -m recbole_st2si.benchmark "${common[@]}" --protocol=uni19 \
    --output_dir="$out/$best" --learning_rate="$rate" --train_window="$window" > "$out/$best-uni19.log" 2>&1
fi

"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# ST2SI full fine-tuning on ml-100k: learning rate x train_window (benchmarks/gpu_recipe_study.sh)", "",
         "| run | protocol | status | epochs | valid NDCG@10 | test NDCG@10 | test Recall@10 | test Hit@1 | train time (s) |",
         "|---|---|---|---|---|---|---|---|---|"]
for path in sorted(out.glob("*/ml-100k*/runs/*.json")):
    record = json.loads(path.read_text())
    test = record.get("test_result") or {}
    cells = [path.parts[-4], record["request"]["eval_mode"], record.get("status", "?"), record.get("epochs", "–"),
             record.get("best_valid_score", "–"), test.get("ndcg@10", "–"), test.get("recall@10", "–"),
             test.get("hit@1", "–"), round(record["train_time_s"]) if "train_time_s" in record else "–"]
    lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
(out / "README.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
