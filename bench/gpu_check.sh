#!/usr/bin/env bash
# The GPU measurement in one command: the measurements take --budget seconds (240 by default, 4 minutes on an
# H100/H200; a compile that starts near the end may overrun it by a minute), start-up and the photos a minute more,
# then `siglip bench` up to 90 s. Allow budget + 240 s in all (8 minutes by default).
#   bash bench/gpu_check.sh [OUT_DIR] [gpu_check.py options]      e.g. bash bench/gpu_check.sh out --budget 300
# Writes the environment and the table (gpu_check.log, gpu_check.json), kernel profiles, and a run of the user-facing
# `siglip bench` on the same GPU into OUT_DIR (default gpu_check_out). Options of the Python part: gpu_check.py -h
set -uo pipefail
out=gpu_check_out
if [ $# -gt 0 ] && [[ $1 != -* ]]; then out=$1; shift; fi  # OUT_DIR is optional: options may come first
root=$(cd "$(dirname "$0")/.." && pwd)
# The Python the project is installed in: $PYTHON, else the README's .venv, else python3 on PATH.
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$py" -c "import torch, torchvision, PIL; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__, 'cpus', __import__('os').cpu_count())"
} 2>&1 | tee "$out/gpu_check.log"
"$py" "$root/bench/gpu_check.py" --profile-dir "$out" --json-out "$out/gpu_check.json" "$@" 2>&1 | tee -a "$out/gpu_check.log"
status=$?  # the measurement's own exit status (pipefail)
# The command users run, eager (compiling is gpu_check's job), on the same GPU: checks it end to end on CUDA.
timeout 90 "$py" -m siglip_cli bench --device cuda --batch-size 64,256 --no-compile --compare transformers,timm --json \
    > "$out/siglip_bench.json" 2> "$out/siglip_bench.err"
bench_status=$?
echo "siglip bench exit $bench_status"; tail -3 "$out/siglip_bench.err"
exit $((status != 0 ? status : bench_status))  # the measurement's failure first, else the command's
