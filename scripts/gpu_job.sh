#!/usr/bin/env bash
# One device-machine job (see the device tool's README).
#
# Here, before the call (commit first, so that the results name a real commit):
#   mkdir -p .gpu .whl && cp ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.xz .gpu/
#   git rev-parse HEAD > .gpu/COMMIT        # the device's copy has no .git
#   pip download --no-deps --only-binary=:all: torchattacks==3.5.1 -d .whl
# The call:  run(command="bash scripts/gpu_job.sh session|bench|reproduce", carry=[".gpu", ".whl"])
# After it:  tar -xzf <files_at>/compile-cache.tgz -C .gpu   (when it came back: the next machine
#            skips most of compiling; anchor_lib/compile_cache.py)
#   session:   STAGES (default "bench tutorial"; "probe" adds benchmarks/gpu_probe.py, PROBE_ONLY
#              picks its stages; "precision" ends with benchmarks/eval_precision.py): the
#              benchmark, then the tutorial-profile runs (standard, pgd_at, anchor, each exported
#              as an fp16 tutorial checkpoint once finished; then trades, supcon_at), each stage
#              under a timeout so that one call (BUDGET_S, default 540 s) stays inside the
#              10-minute limit and returns what finished. JOB_PARALLEL=1 runs every method of
#              JOB_RUNS as its own process at the same time (JOB_THREADS CPU threads each).
#   bench:     the benchmark alone.   reproduce: one slot of the full reproduction.
#   start [MODE]: a job longer than one call (a full-profile run takes 8 to 12 minutes): copies
#              this tree to /tmp/anchor-bg/tree, where the next call's copy of the working tree
#              cannot touch it, starts `MODE` (default session) there in the background, then
#              polls. poll: waits up to POLL_S (default 540) s for it; brings back its output
#              when it has finished, else bg.log and partial.tgz (what has finished so far;
#              refreshed every minute, so a call the session's budget cuts short keeps them).
#              Budget: a session's 900 s of device time hold the start-up (60-120 s), both
#              calls and the gap between them, so a start + poll plan needs BUDGET_S <= ~700 and
#              the poll's POLL_S at most the lease's budget_left_s less ~45 s.
#              E.g. JOB_PROFILE=full JOB_RUNS=pgd_at STAGES=tutorial BUDGET_S=1500 ... start,
#              then `poll` in the next call, before the machine's idle release.
#              An ablation slot: JOB_PROFILE=full JOB_RUNS=anchor JOB_ARGS="--ablation --params beta
#              --attacks clean,fgsm,pgd20,cw --no-sanity" STAGES=tutorial ... start
#              JOB_THEN_ARGS (with JOB_THEN_RUNS, default anchor): after JOB_RUNS, in the time
#              left, the same profile once more with these arguments instead of JOB_ARGS, e.g. a
#              full run, then ablation runs: JOB_RUNS=anchor JOB_THEN_ARGS="--ablation ..."
#              Order: the ablation's tau, beta and lambda before the full anchor and supcon_at
#              runs, which reproduce trains with the values ablation_summary.json chose (at
#              the full profile it runs the missing ablation first, unless --default-knobs).
# Results land in $OUT: only the files the job wrote (newer than its start; weights left out), as
# results.tgz (partial.tgz while a background job runs), paths from the repository root: unpack
# them there (`cat results.tgz.part* | tar -xz` when it came in parts) and commit the run folders
# that have a metrics.json, with the command and hardware (README, "Command line").
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "${JOB_SITE:-/tmp/site}" .whl/*.whl
  export PYTHONPATH="${JOB_SITE:-/tmp/site}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
export ANCHOR_DATA_DIR="$PWD/.gpu" ANCHOR_OFFLINE=1 ANCHOR_CACHE_DIR="${JOB_CACHE_DIR:-/tmp/anchor-cache}"
# What earlier machines compiled (anchor_lib.compile_cache): loaded before the first compile,
# added to by each compiled run, and brought back in $OUT (unpack it into .gpu/ here).
export ANCHOR_COMPILE_CACHE="$PWD/.gpu/compile-cache"
export ANCHOR_COMMIT="$(cat .gpu/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
bg=${JOB_BG:-/tmp/anchor-bg}
self=$(realpath "$0")
# Only what the job itself writes goes back: the files newer than this stamp. The committed results
# alone pack to about 14.6 MB, so packing all of data/results would pass the 16 MB a returned file
# may have after one more full run, and the whole archive would be lost.
stamp=${JOB_STAMP:-}
if [ -z "$stamp" ] || [ ! -f "$stamp" ]; then stamp=$(mktemp); fi
split_if_large() {  # FILE: over 16 MB it would not come back; in parts of 15 MB it does
  local size; size=$(stat -c %s "$1")
  if [ "$size" -gt 16000000 ]; then
    split -b 15000000 -d "$1" "$1.part" && rm "$1"
    echo "$(basename "$1"): $size bytes, more than a returned file may have: split into" \
      "$(basename "$1").part00, part01, ... (here: cat them together, then unpack)"
  fi
}
pack() {  # NAME PATH...: the files under PATH written since the job started, weights aside
  # The temporary files of the library's atomic writes (.<name>.<hex>.tmp) are left out: one may
  # be a checkpoint being written, or be renamed away while tar reads it (tar then says so and
  # packs the rest). Packed beside $OUT and moved in, so a call cut short mid-tar keeps the last
  # whole archive, and no part of an earlier, larger one is left beside it.
  local name=$1 tmp; shift
  tmp=$(mktemp "${TMPDIR:-/tmp}/pack.XXXXXX")
  find "$@" -type f -newer "$stamp" ! -name 'checkpoint.pt*' ! -name 'best.pt*' \
    ! -name '.*.tmp' -print0 2>/dev/null \
    | tar -czf "$tmp" --ignore-failed-read --warning=no-file-changed --null -T - \
    || echo "pack $name: a file changed or went while it was read; packed the rest" >&2
  rm -f "$OUT/$name" "$OUT/$name".part*
  mv "$tmp" "$OUT/$name"
  split_if_large "$OUT/$name"
}
keep_compile_cache() {  # into $OUT as one file, if it can come back (16 MB a file)
  if ls "$ANCHOR_COMPILE_CACHE"/*.bin >/dev/null 2>&1; then
    tar -czf "$OUT/compile-cache.tgz" -C "$(dirname "$ANCHOR_COMPILE_CACHE")" \
      "$(basename "$ANCHOR_COMPILE_CACHE")"
    size=$(stat -c %s "$OUT/compile-cache.tgz")
    if [ "$size" -gt 16000000 ]; then
      rm "$OUT/compile-cache.tgz"; echo "compile cache: $size bytes packed, too large to bring back"
    fi
  fi
}
case "${1:-bench}" in
  start)
    # A later call may not see the job's pid (each call can run in its own process namespace:
    # `kill -0` failed there on 2026-11-27), so "running" is: started, no exit status yet, and a
    # log written to within 15 minutes (a job killed with the machine's lease leaves none).
    if [ -f "$bg/pid" ] && [ ! -f "$bg/rc" ] \
        && [ -n "$(find "$bg" -maxdepth 2 -name '*.log' -mmin -15 2>/dev/null)" ]; then
      echo "a background job is already running (pid $(cat "$bg/pid")): polling it"
    else
      rm -rf "$bg" && mkdir -p "$bg/out"
      cp -a . "$bg/tree"  # (-a keeps the files' times: the stamp below is newer than them all)
      touch "$bg/stamp"
      # The copy's own script when it is in the tree: the next call may rewrite this one.
      script="$bg/tree/${self#"$PWD"/}"; [ -f "$script" ] || script=$self
      ( cd "$bg/tree" && OUT="$bg/out" JOB_STAMP="$bg/stamp" setsid nohup bash -c \
          'bash "$1" "$0"; echo $? > ../rc' "${2:-session}" "$script" >"$bg/log" 2>&1 </dev/null &
        echo $! > "$bg/pid" )
      echo "started ${2:-session} in the background (pid $(cat "$bg/pid"))"
    fi
    exec bash "$self" poll
    ;;
  poll)
    [ -f "$bg/pid" ] || { echo "no background job on this machine (a fresh one?)" >&2; exit 1; }
    [ -f "$bg/stamp" ] || touch -d @0 "$bg/stamp"  # a job started without one: all its files
    stamp="$bg/stamp"
    snapshot() {  # the logs and finished artifacts so far: what comes back if this call is cut short
      tail -c 200000 "$bg/log" > "$OUT/bg.log" 2>/dev/null || true
      # The session's own log (training progress); its other files come when it ends.
      [ -f "$bg/out/job.log" ] && tail -c 200000 "$bg/out/job.log" > "$OUT/job.log"
      ( cd "$bg/tree" && pack partial.tgz data/results )
    }
    deadline=$(( SECONDS + ${POLL_S:-540} )); next=0
    while [ ! -f "$bg/rc" ] && [ "$SECONDS" -lt "$deadline" ]; do
      if [ "$SECONDS" -ge "$next" ]; then snapshot >/dev/null || true; next=$(( SECONDS + 60 )); fi
      sleep 5
    done
    if [ -f "$bg/rc" ]; then
      rm -f "$OUT"/partial.tgz*
      tail -c 200000 "$bg/log" > "$OUT/bg.log" 2>/dev/null || true
      cp "$bg"/out/* "$OUT/" 2>/dev/null || true
      echo "== background: finished, rc $(cat "$bg/rc")"
    else
      snapshot || echo "snapshot: rc $? (what came back so far is kept)"
      # What it compiled so far (saved after each run's first epoch), in case this is the last call.
      ANCHOR_COMPILE_CACHE="$bg/tree/.gpu/compile-cache" keep_compile_cache
      echo "== background: still running after ${POLL_S:-540} s; poll again"
    fi
    # The session's log holds every line it printed; bg.log repeats them (before it exists: not).
    summary="$bg/out/job.log"; [ -f "$summary" ] || summary="$bg/log"
    tr '\r' '\n' < "$summary" 2>/dev/null \
      | grep -E "^==|done in|epoch [0-9]+/[0-9]+ loss" | tail -20 || true
    ;;
  bench)
    { nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no nvidia-smi"; } \
      | tee "$OUT/gpu.txt"
    python3 -m anchor_lib bench --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" \
      || echo "bench: rc $?"  # what it wrote still comes back
    keep_compile_cache
    ;;
  reproduce)
    # Restartable: finished runs are skipped, unfinished ones resume from data/results/*/checkpoint.pt.
    # Within one call only: the next call's copy of the working tree removes the files it does not
    # hold (metrics.json and the like; ignored *.pt stay). For more, `start reproduce`.
    python3 -m anchor_lib reproduce --profile full --out data/results 2>&1 \
      | tee "$OUT/reproduce.log" || echo "reproduce: rc $?"  # what finished still comes back
    # Checkpoints (~90 MB each) stay on the machine; only the small artifacts come back.
    pack results.tgz data/results
    keep_compile_cache
    ;;
  session)
    set +e  # a failed stage must not cost the stages after it
    # What the tests change to run this on a CPU in seconds (defaults: the device job).
    profile=${JOB_PROFILE:-tutorial}; results=${JOB_RESULTS:-data/results}
    ckpts=${JOB_CHECKPOINTS:-data/checkpoints}; extra=${JOB_ARGS:-}
    IFS=, read -ra run_groups <<< "${JOB_RUNS:-standard pgd_at anchor,trades supcon_at}"
    log="$OUT/job.log"
    run_methods() {  # SECONDS_LEFT "METHOD ..." [ARGS]: train and evaluate them, one after another
      # reproduce starts only the runs that the finished ones say will end in time (a full run
      # cut short is lost whole), and goes on to the next; JOB_TIME_BUDGET=0 turns that off.
      local fit=()
      # (30 s short of the hard limit: Python's start and the unmeasured parts of a run)
      [ "${JOB_TIME_BUDGET:-1}" = 1 ] && fit=(--time-budget "$(( $1 > 40 ? $1 - 30 : 10 ))")
      # shellcheck disable=SC2086  # word splitting of the method list and extra arguments
      timeout "$1" python3 -m anchor_lib reproduce --profile "$profile" --out "$results" \
        --methods $2 ${3-$extra} "${fit[@]}"
    }
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
        "import torch, torchattacks; print('torch', torch.__version__, 'torchattacks', torchattacks.__version__)"
      echo "commit $ANCHOR_COMMIT"; } 2>&1 | tee "$log"
    # Decode the JPEG copy on the CPU while the benchmark (random data) uses the GPU.
    decode=
    if [ "${JOB_DECODE:-1}" = 1 ]; then
      python3 -c "from anchor_lib import data; d = data.load_cifar10(download=False); print(d.label)" \
        >>"$log" 2>&1 &
      decode=$!
    fi
    SECONDS=0
    stages=" ${STAGES:-bench tutorial} "
    if [[ $stages == *" bench "* ]]; then
      timeout "${BENCH_S:-270}" python3 -m anchor_lib bench --out "$OUT/bench.json" >>"$log" 2>&1
      echo "== bench: rc $? after ${SECONDS}s" | tee -a "$log"
    fi
    if [[ $stages == *" probe "* ]]; then
      timeout "${PROBE_S:-150}" python3 benchmarks/gpu_probe.py "$OUT/probe.json" >>"$log" 2>&1
      echo "== probe: rc $? after ${SECONDS}s" | tee -a "$log"
    fi
    if [ -n "$decode" ]; then wait "$decode"; echo "== decode: rc $? at ${SECONDS}s" | tee -a "$log"; fi
    exportable=(standard pgd_at anchor)  # the methods whose weights the chapters load
    # Wide models (full, demo) are no tutorial checkpoints: over the size limit.
    if [ "$profile" = full ] || [ "$profile" = demo ]; then exportable=(); fi
    if [[ $stages == *" tutorial "* ]]; then
      # A committed run whose weights did not come back cannot be exported: train it again
      # (a full-profile run is kept: its weights never come back, and it is no checkpoint).
      for m in "${exportable[@]}"; do
        d=$results/$profile-$m
        if [ -f "$d/metrics.json" ] && [ ! -f "$d/best.pt" ]; then rm -rf "$d"; fi
      done
      if [ "${JOB_PARALLEL:-0}" = 1 ]; then
        # Every method its own process, all at once: width-16 runs leave the GPU idle while the
        # host launches kernels (torchattacks' evaluation above all), so others can fill the gaps.
        left=$(( ${BUDGET_S:-540} - SECONDS ))
        logs=$(mktemp -d); pids=(); names=()
        [ "$left" -gt 60 ] || run_groups=()  # (and `timeout 0` would mean no limit at all)
        # shellcheck disable=SC2068  # every method of every group, one word each
        for m in ${run_groups[@]}; do
          OMP_NUM_THREADS=${JOB_THREADS:-3} run_methods "$left" "$m" >"$logs/$m.log" 2>&1 &
          pids+=($!); names+=("$m")
        done
        for i in "${!pids[@]}"; do
          wait "${pids[$i]}"; rc=$?
          cat "$logs/${names[$i]}.log" >>"$log"
          echo "== $profile ${names[$i]}: rc $rc at ${SECONDS}s" | tee -a "$log"
        done
        rm -rf "$logs"
      else
        for methods in "${run_groups[@]}"; do
          left=$(( ${BUDGET_S:-540} - SECONDS ))
          [ "$left" -gt 60 ] || break
          run_methods "$left" "$methods" >>"$log" 2>&1
          echo "== $profile $methods: rc $? at ${SECONDS}s" | tee -a "$log"
        done
        # Then, in the time left, the same profile with other arguments: an ablation slot after
        # a full run keeps the GPU busy without a second call (JOB_THEN_RUNS, default anchor).
        left=$(( ${BUDGET_S:-540} - SECONDS ))
        if [ -n "${JOB_THEN_ARGS:-}" ] && [ "$left" -gt 60 ]; then
          run_methods "$left" "${JOB_THEN_RUNS:-anchor}" "$JOB_THEN_ARGS" >>"$log" 2>&1
          echo "== $profile ${JOB_THEN_RUNS:-anchor} $JOB_THEN_ARGS: rc $? at ${SECONDS}s" \
            | tee -a "$log"
        fi
      fi
      # Export every finished one of them (a timeout may have cut the rest short).
      done_runs=$(for m in "${exportable[@]}"; do
        [ -f "$results/$profile-$m/metrics.json" ] && printf "'%s'," "$m"; done)
      if [ -n "$done_runs" ]; then
        # Under a timeout too: a job killed here would lose the packing below.
        timeout "${EXPORT_S:-60}" python3 -c "from anchor_lib import reproduce as r; r.export_tutorial_checkpoints(\
'$results', '$ckpts', methods=($done_runs), profile='$profile')" >>"$log" 2>&1
        echo "== export: rc $? at ${SECONDS}s" | tee -a "$log"
      fi
    fi
    if [[ $stages == *" precision "* ]]; then
      # PGD-20 in fp32, TF32 and bf16 on the first finished run's model (DESIGN §4's 0.2 rule),
      # on its first PRECISION_N test images (default all); PRECISION_AA_N=K adds AutoAttack on
      # the first K, searched in fp32 and in TF32 (about 250 s in fp32 for K = 1000).
      for d in "$results/$profile"-*; do
        [ -f "$d/metrics.json" ] && [ -f "$d/best.pt" ] || continue
        timeout "${PRECISION_S:-150}" python3 "${self%/scripts/*}/benchmarks/eval_precision.py" "$OUT/precision.json" \
          "$d/best.pt" ${PRECISION_N:-} ${PRECISION_AA_N:+--autoattack "$PRECISION_AA_N"} >>"$log" 2>&1
        echo "== precision ($d): rc $? at ${SECONDS}s" | tee -a "$log"
        break
      done
    fi
    mkdir -p "$results" "$ckpts"
    # Small artifacts, and the resume checkpoints of runs a timeout cut short (width 16: ~6 MB).
    pack results.tgz "$results" "$ckpts"
    unfinished=$(for d in "$results/$profile"-*; do
      [ -f "$d/checkpoint.pt" ] && [ ! -f "$d/metrics.json" ] && echo "$d"; done)
    # shellcheck disable=SC2086  # (a full-profile checkpoint, ~90 MB, cannot come back anyway)
    [ -n "$unfinished" ] && [ "$profile" != full ] && tar -czf "$OUT/resume.tgz" $unfinished
    keep_compile_cache | tee -a "$log"
    grep -E "^==|wrote|Error|error" "$log" | tail -40
    exit 0
    ;;
  *) echo "usage: $0 session|bench|reproduce|start [MODE]|poll" >&2; exit 2 ;;
esac
