#!/usr/bin/env bash
# Remote registry throughput: `mmx push` and `mmx pull --from` of one adapter set against boto3
# moving the same bytes (upload_file / download_file with its default transfer settings: 8 MiB
# parts, 10 threads, what `aws s3 cp` uses) to and from the same moto server on loopback, in
# the same run. moto is a Python server, so both sides are bounded by it: the ratio is the
# figure, not the absolute rate.
#
# usage: scripts/bench-remote.sh [WORKDIR]     (default /tmp/mmx-bench-remote)
# Needs a release build (cargo build --release) and python3; moto (with boto3) comes from
# scripts/s3-server.sh's virtual environment. The adapters are 4 random rank-64 LoRAs of the
# Qwen2-0.5B shapes written by scripts/make_bench_loras.py (numpy is installed into that
# environment on first use). Everything the script makes is under WORKDIR.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-/tmp/mmx-bench-remote}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
VENV=${MMX_MOTO_VENV:-$ROOT/target/moto-venv}
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
bash "$ROOT/scripts/s3-server.sh" "$port" $$ &
for _ in $(seq 1200); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.25
done
"$VENV/bin/python" -c 'import numpy' 2>/dev/null || "$VENV/bin/pip" install --quiet numpy
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
    AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
curl -s -X PUT "$AWS_ENDPOINT_URL/bench" >/dev/null

SET=$WORKDIR/loras
[ -d "$SET/lora3" ] || "$VENV/bin/python" "$ROOT/scripts/make_bench_loras.py" --out "$SET" --rank 64 --experts 4
LOCAL=$WORKDIR/registry
rm -rf "$LOCAL" "$WORKDIR/cache" "$WORKDIR/copies"
for d in "$SET"/lora*; do "$MMX" publish "$d" "$(basename "$d"):v1" --registry "$LOCAL" >/dev/null; done
bytes=$(du -cb "$SET"/lora*/adapter_model.safetensors | tail -1 | cut -f1)

secs() {
    local start
    start=$(date +%s.%N)
    "$@" >/dev/null
    awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}
push_all() { for d in "$SET"/lora*; do "$MMX" push "$(basename "$d"):v1" --to s3://bench/mmx --registry "$LOCAL" --quiet --parallel "${PARALLEL:-8}"; done; }
pull_all() { for d in "$SET"/lora*; do "$MMX" pull "$(basename "$d"):v1" --from s3://bench/mmx --registry "$WORKDIR/cache" --quiet --parallel "${PARALLEL:-8}"; done; }

push=$(secs push_all)
pull=$(secs pull_all)
cat >"$WORKDIR/boto.py" <<'EOF'
import sys, time, boto3
from boto3.s3.transfer import TransferConfig
s3, files, copies = boto3.client("s3"), sys.argv[2:], sys.argv[1]
config = TransferConfig()  # what `aws s3 cp` uses: 8 MiB parts, 10 threads
start = time.perf_counter()
for i, f in enumerate(files):
    s3.upload_file(f, "bench", f"boto/{i}", Config=config)
up = time.perf_counter() - start
start = time.perf_counter()
for i, f in enumerate(files):
    s3.download_file("bench", f"boto/{i}", f"{copies}/{i}", Config=config)
print(f"{up:.2f} {time.perf_counter() - start:.2f}")
EOF
mkdir -p "$WORKDIR/copies"
read -r boto_up boto_down < <("$VENV/bin/python" "$WORKDIR/boto.py" "$WORKDIR/copies" "$SET"/lora*/adapter_model.safetensors)

rate() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f MB/s", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)'), boto3 $("$VENV/bin/python" -c 'import boto3; print(boto3.__version__)')"
echo "4 adapters, $bytes bytes of tensors"
printf '| operation | mmx s | boto3 s | mmx rate | boto3 rate | boto3 time / mmx time |\n| --- | ---: | ---: | ---: | ---: | ---: |\n'
printf '| push / upload_file | %s | %s | %s | %s | %s |\n' "$push" "$boto_up" "$(rate "$push")" "$(rate "$boto_up")" "$(ratio "$boto_up" "$push")"
printf '| pull --from / download_file | %s | %s | %s | %s | %s |\n' "$pull" "$boto_down" "$(rate "$pull")" "$(rate "$boto_down")" "$(ratio "$boto_down" "$pull")"
rm -rf "$WORKDIR/copies" "$WORKDIR/cache"
