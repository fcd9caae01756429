#!/usr/bin/env bash
# Registry speed: publish and verify --read-data of a ~1 GiB adapter set against the floor of
# hashing (blake3, all cores) plus durably copying the same bytes (examples/hash_copy.rs);
# republishing unchanged content; and the dedup of a merged full model against its base.
#
# usage: scripts/bench-registry.sh [WORKDIR]      (default /tmp/mmx-bench)
# Needs WORKDIR/loras-1g (scripts/make_bench_loras.py --rank 64 --experts 8: 8 × 141 MB),
# WORKDIR/models/base and WORKDIR/loras (for the dedup merge), and release builds:
#   cargo build --release && cargo build --release --example hash_copy
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-/tmp/mmx-bench}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
COPY=$ROOT/target/release/examples/hash_copy
SET=$WORKDIR/loras-1g
REG=$WORKDIR/registry-bench
secs() { /usr/bin/time -f "%e" -o "$WORKDIR/t" "$@" >/dev/null; cat "$WORKDIR/t"; }

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
bytes=$(du -cb "$SET" | tail -1 | cut -f1)
echo "adapter set: $(ls "$SET" | wc -l) adapters, $bytes bytes"

rm -rf "$WORKDIR/copy" && floor_copy=$(secs "$COPY" "$WORKDIR/copy" "$SET") && rm -rf "$WORKDIR/copy"
floor_hash=$(secs "$COPY" "$WORKDIR/copy" "$SET" --hash-only)
rm -rf "$REG"
publish=$(secs bash -c "for d in $SET/*; do $MMX publish \$d \$(basename \$d):v1 --registry $REG; done")
verify=$(secs "$MMX" verify --read-data --registry "$REG")
republish=$(secs bash -c "for d in $SET/*; do $MMX publish \$d \$(basename \$d):v1 --registry $REG; done")
written=$(for d in "$SET"/*; do "$MMX" publish "$d" "$(basename "$d"):v1" --registry "$REG"; done | grep -o '[0-9]* written' | awk '{s += $1} END {print s}')
rate() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.2f GB/s", b / s / 1e9 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
printf '| operation | wall s | throughput | share of the floor |\n| --- | ---: | ---: | ---: |\n'
printf '| floor: blake3 + durable copy | %s | %s | 100%% |\n' "$floor_copy" "$(rate "$floor_copy")"
printf '| floor: blake3 only | %s | %s | |\n' "$floor_hash" "$(rate "$floor_hash")"
printf '| mmx publish (8 adapters, fresh registry) | %s | %s | %s of hash+copy |\n' "$publish" "$(rate "$publish")" "$(ratio "$floor_copy" "$publish")"
printf '| mmx verify --read-data | %s | %s | %s of hash+copy, %s of hash only |\n' "$verify" "$(rate "$verify")" "$(ratio "$floor_copy" "$verify")" "$(ratio "$floor_hash" "$verify")"
printf '| mmx publish again (unchanged) | %s | | blobs written: %s |\n' "$republish" "$written"

# Dedup: a merged full model that changes only the linear layers shares the rest with its base.
"$MMX" publish "$WORKDIR/models/base" qwen-base:v1 --registry "$REG" >/dev/null
{
    printf "[merge]\nmethod = 'ties'\nbase = '%s'\noutput = 'full'\ndtype = 'bfloat16'\n[merge.parameters]\ndensity = 0.5\n" "$WORKDIR/models/base"
    for i in 0 1; do printf "[[merge.experts]]\nsource = '%s'\n" "$WORKDIR/loras/lora$i"; done
} > "$WORKDIR/dedup.toml"
rm -rf "$WORKDIR/out-dedup"
"$MMX" merge "$WORKDIR/dedup.toml" -o "$WORKDIR/out-dedup" --publish merged:v1 --registry "$REG" 2>&1 >/dev/null | grep published
"$MMX" publish "$WORKDIR/out-dedup" merged:v1 --registry "$REG" --force | head -1
