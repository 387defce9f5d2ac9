#!/usr/bin/env bash
# What one GPU lease runs (about 10 minutes of an H100/H200), in the repository root:
#   1. the headline chain (experiment=headline_cifar10, tracking off), its summary and run folder;
#   2. VARIANTS (optional): more headline chains, each with its extra overrides, from the same
#      prefix cache, so the steps before the first changed one are reused (P/Q/E variants cost
#      about a minute each; VARIANT_JOBS=N runs N at once); pick among them on validation, not test;
#   3. the training-throughput benchmark on CIFAR-10 for ResNet-18 (batch 512, exit heads too)
#      and ResNet-34 (batch 256), bf16-mixed, one round each, QAT with the eager quantizer and
#      with the Triton kernels (--triton; BENCH=0 skips the benchmark, CHAIN=0 the chain: one
#      call may run 600 s, so a session splits chain + variants and the benchmark);
#   4. ORDERS=1 (off by default; runs before the benchmark): the 24-order study, resumable
#      across calls on a warm machine (ORDERS_LIMIT: seconds per call, ORDERS_ARGS: overrides)
#      and across leases (ORDERS_FROM: a carried folder with the last lease's orders.journal
#      and orders-chains.tgz);
#   5. PROFILE=1 (off by default; before the benchmark): benchmarks/qat_profile.py on both nets
#      (PROFILE_LIMIT seconds each, PROFILE_ARGS; default: the eager and the Triton quantizer).
#   6. DECODE=1 (off by default; before the benchmark): benchmarks/decode_imagefolder.py, the
#      first load of the CIFAR-10 archive in one process against the decode workers (decode.log).
# BENCH_ROUNDS (default 1): rounds of the benchmark (2 or more alternate the framework/plain pair);
# BENCH_ARGS="trainer.compile=reduce-overhead": every benchmark path compiled (CUDA graphs);
# BENCH_FIRST="model batch [flags];...": benchmark these before the chain, and QUANT_KERNEL=auto
# then runs the chain's QAT on the Triton kernels if that benchmark found them equal and faster.
# Everything lands in $OUT (default /tmp/gpu_out): env.txt, headline.log, summary.json,
# headline_run.tgz, variants.tgz (variant-<i>.log / .json), bench.log; with ORDERS=1 orders.log,
# orders-summary.json, orders.journal, orders-chains.tgz and orders-report.tgz (the tables,
# experiments/<study>/results/cifar10/). A lease returns at most 8 files: on exit,
# benchmarks/pack_out.sh packs the variants' files, and the logs too (logs.tgz) if still more
# than 8, and warns of what would not return. Each chain's result is also one line of output
# ("headline: ...", "variant <i>: ..."). Each
# phase has its own time limit, so a slow phase cannot take the next one's results with it.
#
#   VARIANTS='chain.steps.P.settings.kd_alpha=0 chain.steps.Q.settings.kd_alpha=0;chain.steps.P.settings.ratio=0.2'
#   (variants separated by ";", overrides within one by spaces; VARIANT_LIMIT: seconds for each;
#   VARIANT_JOBS: how many run at once, default 1; VARIANT_EXPERIMENT: the experiment config the
#   variants start from, default headline_cifar10, e.g. orders_cifar10 for single chains of the
#   order study)
#
#   OUT=/tmp/out benchmarks/gpu_session.sh
#
# Without network on that machine: put wheels of hydra-core, omegaconf, antlr4-python3-runtime,
# torch-pruning, optuna and colorlog (the sweep's; optuna needs no SQLAlchemy for its journal) in
# .whl/ and the CIFAR-10 archive in .gpu/ (CHAINCOMP_DATA_DIR), and carry both: `make gpu-carry`
# makes the two folders (the wheels at the versions of .venv; both are in .gitignore).
# WHEELS (default .whl): the wheels' folder; RUNS (default /tmp): where the run folders go.
# CHAIN_ARGS / BENCH_ARGS: extra overrides (the CPU proof of this script makes everything tiny);
# CHAIN_LIMIT / BENCH_LIMIT: seconds allowed per phase; TRITON= (empty) drops --triton (CPU proof).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
# on exit, fit $OUT to what a lease returns (8 files at most: variants.tgz, logs.tgz; see there)
HERE=$(cd "$(dirname "$0")" >/dev/null && pwd)
trap 'bash "$HERE/pack_out.sh" "$OUT"' EXIT
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CHAINCOMP_DATA_DIR=${CHAINCOMP_DATA_DIR:-$PWD/.gpu}
export CHAINCOMP_CACHE_DIR=${CHAINCOMP_CACHE_DIR:-$PWD/.chaincomp}
PY=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
  nproc; } >"$OUT/env.txt" 2>&1

# bench SPECS: the throughput benchmark once per "model batch [flags]" spec (";" between specs)
bench() {
  local specs spec
  IFS=';' read -r -a specs <<<"$1"
  for spec in "${specs[@]}"; do
    # shellcheck disable=SC2086
    set -- $spec
    [ $# -ge 2 ] || continue
    local model=$1 batch=$2 start
    shift 2
    start=$(date +%s)
    # its own log too (bench-<model>.log, this call's only), for QUANT_KERNEL=auto; the eager
    # QAT line must time eager whatever the chain uses (the Triton line sets its own kernel)
    # shellcheck disable=SC2086
    CHAINCOMP_QUANT_KERNEL=eager timeout "${BENCH_LIMIT:-200}" $PY benchmarks/train_throughput.py \
      data=cifar10 model="$model" data.batch_size="$batch" --epochs "${BENCH_EPOCHS:-3}" \
      --rounds "${BENCH_ROUNDS:-1}" ${TRITON---triton} "$@" ${BENCH_ARGS:-} \
      >"$OUT/bench-$model.log" 2>&1
    echo "bench $model: rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/bench-$model.log"
    cat "$OUT/bench-$model.log" >>"$OUT/bench.log"
  done
}

# triton_wins LOG...: every log has the Triton check all True (none False) and a Triton QAT
# overhead below the eager one
triton_wins() {
  local log
  for log in "$@"; do
    grep -q "act_values_equal=True act_grads_equal=True" "$log" 2>/dev/null || return 1
    grep -q "weight_values_equal=True weight_grads_equal=True" "$log" || return 1
    ! grep -q "_equal=False\|error=" "$log" || return 1
    awk '/^QAT overhead float\/QAT/ {e=$NF} /^QAT overhead \(Triton\)/ {t=$NF}
         END {exit !(e != "" && t != "" && t + 0 < e + 0)}' "$log" || return 1
  done
}

# BENCH_FIRST: specs benchmarked before the chain (then left out of BENCH_SPECS by the caller).
# QUANT_KERNEL=auto: the chain's QAT uses the Triton kernels when the benchmark so far found
# them identical to eager on this card (values and gradients) and faster (QAT overhead lower).
# The chain and its variants (only they) run with CHAINCOMP_QUANT_KERNEL=$chain_kernel.
chain_kernel=${QUANT_KERNEL:-${CHAINCOMP_QUANT_KERNEL:-eager}}
if [ "$chain_kernel" = auto ]; then
  chain_kernel=eager
  if [ -n "${BENCH_FIRST:-}" ]; then
    bench "$BENCH_FIRST"
    logs=()
    IFS=';' read -r -a first_specs <<<"$BENCH_FIRST"
    for spec in "${first_specs[@]}"; do
      read -r model _ <<<"$spec"
      [ -n "$model" ] && logs+=("$OUT/bench-$model.log")
    done
    [ ${#logs[@]} -gt 0 ] && triton_wins "${logs[@]}" && chain_kernel=triton
  fi
elif [ -n "${BENCH_FIRST:-}" ]; then
  bench "$BENCH_FIRST"
fi
echo "chain quantizer: $chain_kernel" | tee -a "$OUT/env.txt"

# result_line LABEL SUMMARY: a chain's baseline and final metric (val / test) and its BitOps
# reduction on one line, so the call's answer holds the result even if a file does not return
result_line() {
  [ -f "$2" ] || return 0
  $PY -c "import json, sys; s = json.load(open(sys.argv[2])); b = s['baseline']
print('%s: %s baseline %.2f / %.2f, final %.2f / %.2f (val / test), %.1fx fewer BitOps' % (
    sys.argv[1], s['letters'] or 'baseline only', b['val_metric'], b['test_metric'],
    s['val_metric'], s['test_metric'], s['bitops_ratio']))" "$1" "$2"
}

RUNS=${RUNS:-/tmp}  # where the run folders go (headline_run, variant_run_<i>)
run_dir=$RUNS/headline_run
if [ "${CHAIN:-1}" != 0 ]; then
  rm -rf "$run_dir"
  start=$(date +%s)
  set -f  # CHAIN_ARGS split on spaces, not globbed
  # shellcheck disable=SC2086
  CHAINCOMP_QUANT_KERNEL=$chain_kernel timeout "${CHAIN_LIMIT:-400}" \
    $PY -m chaincomp run experiment=headline_cifar10 tracking=none \
    hydra.run.dir="$run_dir" ${CHAIN_ARGS:-} >"$OUT/headline.log" 2>&1
  echo "headline: rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/headline.log"
  set +f
  cp "$run_dir/summary.json" "$OUT/" 2>/dev/null
  result_line headline "$OUT/summary.json" | tee -a "$OUT/headline.log"
  tar czf "$OUT/headline_run.tgz" -C "$RUNS" headline_run 2>/dev/null
fi

# VARIANT_JOBS=N runs up to N variants at once on the card (default 1: one after another). A
# lone chain leaves the card idle while the host launches kernels (the small pruned and
# quantized nets are host-bound), so a few at once should finish sooner than in a row (not
# yet measured on a card). Their per-step seconds then measure a shared card, not a step's
# cost; the chain's (phase 1) do. Variants that need the same step not yet cached train it
# once: one takes the step's compute lock in the prefix cache, the others wait for it and take
# it from the cache (tests/test_gpu_session.py); the chain (phase 1) caches the baseline first.
# Each then gets its share of the host's cores (OMP_NUM_THREADS, unless set): N processes with a
# thread per core each oversubscribe the host (on 2 cores, 2 at once ran 20-40x slower).
IFS=';' read -r -a variants <<<"${VARIANTS:-}"
jobs_max=${VARIANT_JOBS:-1}
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || { echo "VARIANT_JOBS=$jobs_max: a whole number >= 1" >&2; exit 2; }
variant_env=(CHAINCOMP_QUANT_KERNEL="$chain_kernel")  # never empty: "${a[@]}" of an empty array fails under set -u before bash 4.4
if [ "$jobs_max" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  variant_env+=("OMP_NUM_THREADS=$(( $(nproc) / jobs_max > 0 ? $(nproc) / jobs_max : 1 ))")
fi
# run_variant I OVERRIDES: one variant in its own run folder, its log, its summary
run_variant() {
  local i=$1 variant=$2 dir=$RUNS/variant_run_$1 start
  set -f  # overrides split on spaces, never globbed (x.points=[1,2] would match a file)
  rm -rf "$dir"
  start=$(date +%s)
  # shellcheck disable=SC2086
  env "${variant_env[@]}" \
    timeout "${VARIANT_LIMIT:-150}" $PY -m chaincomp run experiment="${VARIANT_EXPERIMENT:-headline_cifar10}" tracking=none \
    hydra.run.dir="$dir" ${CHAIN_ARGS:-} $variant >"$OUT/variant-$i.log" 2>&1
  echo "variant $i ($variant): rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/variant-$i.log"
  cp "$dir/summary.json" "$OUT/variant-$i.json" 2>/dev/null
  result_line "variant $i" "$OUT/variant-$i.json" | tee -a "$OUT/variant-$i.log"
}
i=0
for variant in "${variants[@]}"; do
  i=$((i + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  run_variant "$i" "$variant" &
done
wait
# packed now too, so that a later phase cut off (a SIGKILL skips the exit trap) loses none of them
[ ${#variants[@]} -gt 0 ] && bash "$HERE/pack_out.sh" "$OUT" >/dev/null

if [ "${ORDERS:-0}" != 0 ]; then
  # 4. the order study (experiment=orders_cifar10, tracking off: no MLflow on that machine). Its
  # journal, prefix cache and run folder live in $CHAINCOMP_CACHE_DIR, which a machine keeps
  # between calls while it stays warm (it goes back after a short idle time: call again at
  # once): the same command resumes a cut-off sweep (the killed trials are failed and queued
  # again). The report reads the finished trials' summary.json files. ORDERS_LIMIT leaves room
  # for the report and the copies inside one 600 s call.
  read -r -a orders_args <<<"${ORDERS_ARGS:-}"
  orders_dir=$CHAINCOMP_CACHE_DIR/sweep-orders_cifar10
  # ORDERS_FROM=<folder carried into this lease>: the study an earlier lease began, its
  # orders.journal and orders-chains.tgz as that lease's $OUT returned them. Its finished
  # trials stay and the report reads their summaries; search.reap_other_hosts fails and
  # queues again the trials the earlier machine left RUNNING. The baseline and the prefix
  # cache (too large to carry) are trained again here (cuDNN is not forced deterministic: the
  # baseline may differ slightly; the report then names the baselines' spread).
  if [ -n "${ORDERS_FROM:-}" ]; then
    if [ ! -e "$CHAINCOMP_CACHE_DIR/optuna.journal" ]; then  # not on a warm machine's 2nd call
      # the summaries first, the journal last (whole, by a rename): a restore that fails
      # leaves no journal, so the next call restores again
      mkdir -p "$orders_dir" &&
        tar xzf "$ORDERS_FROM/orders-chains.tgz" -C "$orders_dir" &&
        cp "$ORDERS_FROM/orders.journal" "$CHAINCOMP_CACHE_DIR/optuna.journal.part" &&
        mv "$CHAINCOMP_CACHE_DIR/optuna.journal.part" "$CHAINCOMP_CACHE_DIR/optuna.journal" ||
        exit 1
      echo "orders: resumed from $ORDERS_FROM ($(find "$orders_dir/trials" -name summary.json |
        wc -l) finished chains)" | tee -a "$OUT/orders.log"
    fi
    orders_args+=("search.reap_other_hosts=true")
  fi
  start=$(date +%s)
  timeout -k 30 "${ORDERS_LIMIT:-450}" $PY -m chaincomp sweep experiment=orders_cifar10 \
    tracking=none hydra.run.dir="$orders_dir" "${orders_args[@]}" >>"$OUT/orders.log" 2>&1
  echo "orders: rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/orders.log"
  # the tables, packed: a lease returns at most 8 files, none deeper than $OUT/a/b/
  $PY -m chaincomp report experiment=orders_cifar10 tracking=none "${orders_args[@]}" \
    "report.summaries=['$orders_dir/trials/*/summary.json']" report.out_dir="$OUT/experiments" \
    >>"$OUT/orders.log" 2>&1
  echo "orders report: rc=$?" | tee -a "$OUT/orders.log"
  tar czf "$OUT/orders-report.tgz" -C "$OUT" experiments && rm -rf "$OUT/experiments"
  cp "$orders_dir/summary.json" "$OUT/orders-summary.json" 2>/dev/null
  cp "$CHAINCOMP_CACHE_DIR/optuna.journal" "$OUT/orders.journal" 2>/dev/null
  (cd "$orders_dir" && find trials -name summary.json | tar czf "$OUT/orders-chains.tgz" -T -)
fi

if [ "${PROFILE:-0}" != 0 ]; then
  # 5. PROFILE=1: where a QAT step's time goes (benchmarks/qat_profile.py: wall vs GPU kernel
  # time, host calls, weights / activations split), ResNet-18 at 512 and ResNet-34 at 256
  for spec in "resnet18 512" "resnet34 256"; do
    # shellcheck disable=SC2086
    set -- $spec
    # shellcheck disable=SC2086
    CHAINCOMP_QUANT_KERNEL=eager timeout "${PROFILE_LIMIT:-90}" $PY benchmarks/qat_profile.py \
      --model "$1" --batch "$2" ${PROFILE_ARGS---steps 10 --kernel eager --kernel triton} \
      >>"$OUT/profile.log" 2>&1
    echo "profile $1: rc=$?" | tee -a "$OUT/profile.log"
  done
fi

if [ "${DECODE:-0}" != 0 ]; then
  # 6. DECODE=1: the first load of CIFAR-10's JPEG copy, in one process and in the decode
  # workers (benchmarks/decode_imagefolder.py, two rounds in alternating order: about 40 s)
  timeout "${DECODE_LIMIT:-120}" $PY benchmarks/decode_imagefolder.py \
    "$CHAINCOMP_DATA_DIR/cifar10-jpeg75.tar.gz" --rounds 2 >"$OUT/decode.log" 2>&1
  echo "decode: rc=$?" | tee -a "$OUT/decode.log"
fi

[ "${BENCH:-1}" = 0 ] && exit 0
bench "${BENCH_SPECS:-resnet18 512;resnet34 256 --no-exits}"
