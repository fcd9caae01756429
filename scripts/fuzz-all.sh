#!/usr/bin/env bash
# Fuzzes every parser (fuzz/, src/fuzzing.rs) for SECONDS each, JOBS targets at a time, then
# minimises each corpus into fuzz/corpus/TARGET (replayed on stable by tests/fuzz_corpus.rs).
# Prints, per target, the executions and the crashes (saved under fuzz/artifacts/TARGET).
#
# usage: scripts/fuzz-all.sh [SECONDS] [JOBS]   (default 600 s, 2 at a time)
# Needs the nightly toolchain and cargo-fuzz (cargo +nightly install cargo-fuzz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
SECONDS_EACH=${1:-600}
JOBS=${2:-2}
TARGETS="safetensors_header adapter_config recipe_toml recipe_yaml sweep manifest cases"
logs=$(mktemp -d)
cargo +nightly fuzz build -O >/dev/null 2>&1
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs; ${SECONDS_EACH} s per target"
run() { # TARGET
    mkdir -p "corpus/$1"
    cargo +nightly fuzz run -O "$1" "corpus/$1" -- \
        -max_total_time="$SECONDS_EACH" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        >"$logs/$1.log" 2>&1 || true
}
export -f run
export SECONDS_EACH logs
printf '%s\n' $TARGETS | xargs -P "$JOBS" -I{} bash -c 'run {}'
echo "| target | executions | crashes, timeouts, out of memory | slow inputs (over 10 s once) | corpus before | corpus after |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for t in $TARGETS; do
    runs=$(grep -o 'Done [0-9]* runs' "$logs/$t.log" | grep -o '[0-9]*' || echo "?")
    crashes=$(ls "artifacts/$t" 2>/dev/null | grep -cE '^(crash|timeout|oom)-' || true)
    slow=$(ls "artifacts/$t" 2>/dev/null | grep -c '^slow-unit-' || true)
    before=$(ls "corpus/$t" | wc -l)   # the seeds and what the run added
    # The smallest set of inputs that covers what the run reached.
    cargo +nightly fuzz cmin -O "$t" "corpus/$t" >"$logs/$t.cmin.log" 2>&1 || true
    echo "| $t | $runs | $crashes | $slow | $before | $(ls "corpus/$t" | wc -l) |"
done
echo "logs: $logs"
