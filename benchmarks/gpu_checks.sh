#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md, for a GPU machine without network access.
# Every command runs under the time limit `step` is given below; how long the parts have taken:
# benchmarks/RESULTS.md, "How long the GPU checks run".
#   bash benchmarks/gpu_checks.sh attention  # the separate/fused/sdpa sweep
#   bash benchmarks/gpu_checks.sh speed [FLAGS]  # training throughput, syncs per step, a profile
#   bash benchmarks/gpu_checks.sh breakdown [MODE ...]  # the training step piece by piece, per compile mode
#   bash benchmarks/gpu_checks.sh recipe [OVERRIDES]  # vit-ti16-224 from scratch, evaluate, highres at 384
#   bash benchmarks/gpu_checks.sh ablate "--rand-augment 2" "--epochs 900" ...  # one run per override set
#   bash benchmarks/gpu_checks.sh finetune "--finetune-steps 1000" ...  # highres variants of recipe's model
# speed's FLAGS go to train_throughput.py: "--models vit-ti16 --compile-modes reduce-overhead"
# keeps to the rows that compare the training component with its model step;
# breakdown's modes are default and reduce-overhead unless named.
# DATA is the archive to train on (the headgear zip, or the Fashion-MNIST stand-in); OUT
# receives the logs and JSON results. SMALL=1 runs the same commands with tiny settings (a dry
# run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?attention, speed, breakdown, recipe, ablate or finetune}
DATA=${DATA:?DATA=path/to/archive.zip: the archive to train on}
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export CLEARML_OFFLINE_MODE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 HEADGEAR_DATA_STORE=/tmp/headgear-store

step() {  # step SECONDS LOG COMMAND...: COMMAND within its time limit, its output into the file LOG, then shown
  # A file, not a pipe: a process the command leaves behind (a compile worker, say) would hold
  # a pipe open and the script with it, past every time limit and without its results.
  local seconds=$1 log=$2 status
  shift 2
  timeout -k 10 "$seconds" "$@" > "$log" 2>&1
  status=$?
  tr '\r' '\n' < "$log" | grep -v "ClearML\|Repository Detection\|^train: \|^fine-tune: \|USDT\|^ERROR:\|fetch_version_info\|check_version"
  [ $status -eq 124 ] && echo "(stopped by its time limit)"
  return $status
}

step 60 "$OUT/versions.txt" python3 -c "
import torch, timm, clearml, albumentations
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print(f'{name}; torch {torch.__version__}; timm {timm.__version__}; clearml {clearml.__version__}; '
      f'albumentations {albumentations.__version__}')"
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

if [ "$part" = attention ]; then
  quick=${SMALL:+--quick}
  step 150 "$OUT/attention.log" python3 -m components.benchmark_attention --device "$device" $quick \
    --output-json "$OUT/attention.json"
elif [ "$part" = speed ]; then
  small=${SMALL:+--small}
  read -ra extra <<< "${2:-}"  # e.g. "--models vit-ti16 --compile-modes reduce-overhead"
  # The component for 40 epochs, so that what happens once, at the end (the last validation
  # waited for, a checkpoint), weighs little against the timed epochs.
  step 420 "$OUT/throughput.log" python3 benchmarks/train_throughput.py --data "$DATA" $small \
    --steps 10 --warmup 3 --repeats 3 --component-epochs 40 --output-json "$OUT/throughput.json" "${extra[@]}"
  if [ "$device" = cuda ]; then
    step 90 "$OUT/syncs.log" python3 benchmarks/count_syncs.py --data "$DATA"
  fi
  profiled=(--epochs 6); [ -n "${SMALL:-}" ] && profiled=(--preset smoke --epochs 2)
  step 120 "$OUT/profile.log" python3 benchmarks/profile_train.py --data "$DATA" "${profiled[@]}"
elif [ "$part" = breakdown ]; then
  # One training size, so that the rows differ only in what each adds to the step.
  small=(--train-sizes 224); [ -n "${SMALL:-}" ] && small=(--preset smoke --steps 3 --warmup 1)
  modes=("${@:2}"); [ ${#modes[@]} -eq 0 ] && modes=(default reduce-overhead)
  for mode in "${modes[@]}"; do
    step 90 "$OUT/breakdown-$mode.log" python3 benchmarks/step_breakdown.py --data "$DATA" \
      --compile $mode "${small[@]}"
  done
elif [ "$part" = recipe ]; then
  run=/tmp/recipe
  preset=vit-ti16-224; read -ra extra <<< "${2:-}"  # overrides of the preset, e.g. "--epochs 600"
  if [ -n "${SMALL:-}" ]; then preset=smoke; extra+=(--epochs 2); fi
  start=$(date +%s)
  step 330 "$OUT/train.log" python3 -m components.train --data "$DATA" --preset $preset --output $run "${extra[@]}"
  echo "training wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
  cp $run/train.json "$OUT/"
  step 60 "$OUT/evaluate.log" python3 -m components.evaluate --checkpoint $run/checkpoints/best.pt --data "$DATA" \
    --output-json $run/eval/evaluate.json
  size=384; [ -n "${SMALL:-}" ] && size=56
  step 90 "$OUT/highres.log" python3 -m components.highres --checkpoint $run/checkpoints/best.pt --data "$DATA" \
    --image-size $size --output-json $run/eval/highres.json
  cp $run/curves.png $run/eval/evaluate.json $run/eval/highres.json $run/eval/highres.*.png "$OUT/"
elif [ "$part" = finetune ]; then
  # Each argument is one set of highres flags, run on the model `recipe` trained earlier on the
  # same machine: fine-tunes compared on one checkpoint, one line each in finetune.tsv.
  shift
  size=384; [ -n "${SMALL:-}" ] && size=56
  printf 'flags\ttest_accuracy_bicubic\ttest_accuracy_finetuned\ttest_loss_finetuned\tfinetune_kept' > "$OUT/finetune.tsv"
  printf '\ttest_accuracy_finetuned_interpolated\ttest_loss_finetuned_interpolated\n' >> "$OUT/finetune.tsv"
  for flags in "$@"; do
    rm -f /tmp/finetune.json
    # shellcheck disable=SC2086  # the flags are meant to split
    step 90 "$OUT/finetune-run.log" python3 -m components.highres --checkpoint /tmp/recipe/checkpoints/best.pt \
      --data "$DATA" --image-size $size --output-json /tmp/finetune.json $flags
    python3 - "$flags" >> "$OUT/finetune.tsv" <<'EOF2'
import json, sys
result = json.load(open("/tmp/finetune.json"))
print(f"{sys.argv[1]}\t{result['test_accuracy_bicubic']:.4f}\t{result['test_accuracy_finetuned']:.4f}"
      f"\t{result['test_loss_finetuned']:.4f}\t{result['finetune_kept']:.2f}"
      f"\t{result['test_accuracy_finetuned_interpolated']:.4f}\t{result['test_loss_finetuned_interpolated']:.4f}")
EOF2
  done
  cat "$OUT/finetune.tsv"
elif [ "$part" = ablate ]; then
  # Each argument is one set of overrides of the preset; one line each in ablations.tsv.
  shift
  preset=vit-ti16-224; [ -n "${SMALL:-}" ] && preset=smoke
  printf 'preset\toverrides\tepochs\ttest_accuracy\tseconds\n' > "$OUT/ablations.tsv"
  for overrides in "$@"; do
    run=/tmp/ablate; rm -rf $run
    start=$(date +%s)
    # shellcheck disable=SC2086  # the overrides are meant to split into flags
    step 330 "$OUT/ablate-run.log" python3 -m components.train --data "$DATA" --preset $preset --output $run $overrides \
      | tail -3 | tee -a "$OUT/ablate.log"
    seconds=$(( $(date +%s) - start ))
    step 60 /dev/null python3 -m components.evaluate --checkpoint $run/checkpoints/best.pt --data "$DATA" \
      --output-json $run/evaluate.json
    python3 - "$preset" "$overrides" "$seconds" >> "$OUT/ablations.tsv" <<'EOF'
import json, sys
preset, overrides, seconds = sys.argv[1:]
trained, evaluated = (json.load(open(f"/tmp/ablate/{name}.json")) for name in ("train", "evaluate"))
print(f"{preset}\t{overrides}\t{trained['epochs'][-1]}\t{evaluated['test_accuracy']:.4f}\t{seconds}")
EOF
  done
  cat "$OUT/ablations.tsv"
fi
