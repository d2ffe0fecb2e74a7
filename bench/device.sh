#!/bin/sh
# The speed figures on a lent NVIDIA GPU, in two calls that each fit the device tool's 10 minutes:
#
#   sh bench/device.sh build   # the CUDA libraries and llama-bench/llama-server, from .device/llama.cpp.tar.gz
#   sh bench/device.sh bench   # bench/engine.py and bench/serve.py on .device/fast.gguf, with and without
#                              # llama.cpp sampling in the graph (--backend-sampling)
#
# Run from the repository root with .device carried (made here by `python bench/device_kit.py`). The build
# stays in the machine's cache between two calls while the machine is warm: make the second call at once.
# Everything is written under $OUT, the folder the device tool brings back.
set -eu
out=${OUT:-/tmp/mullama-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stage=${1:-build}
# Hopper (the H200); another GPU needs its own architecture here.
arch=${CUDA_ARCH:-90}

case "$stage" in
build)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
    started=$(date +%s)
    if ! python3 build_native.py --backend cuda --source .device/llama.cpp.tar.gz --with-tools \
            --cmake-option=-DCMAKE_CUDA_ARCHITECTURES="$arch" -j "$(nproc)" > "$out/build.log" 2>&1; then
        tail -n 40 "$out/build.log"
        exit 1
    fi
    echo "built in $(( $(date +%s) - started )) s"
    ;;
bench)
    for script in engine serve; do
        for mode in host graph; do
            flags=""
            [ "$mode" = graph ] && flags=--backend-sampling
            [ "$script" = engine ] && flags="$flags --rounds 5" || flags="$flags --tokens 256"
            log="$out/$script-$mode.txt"
            python3 "bench/$script.py" --model .device/fast.gguf $flags --json > "$log" 2>&1 \
                || { tail -n 20 "$log"; exit 1; }
            grep -v '^{' "$log" | tail -n 20
        done
    done
    ;;
*)
    echo "usage: sh bench/device.sh build|bench" >&2
    exit 2
    ;;
esac
