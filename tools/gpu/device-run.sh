#!/usr/bin/env bash
# One GPU session's run, prepared so that its fifteen minutes cannot be wasted. On the GPU server, in the repository
# root, with the bundle tools/gpu/pack.sh made carried beside it:
#
#   tar xzf gpu-bundle.tar.gz && bash tools/gpu/device-run.sh "$OUT"
#
# Stages, each under its own timeouts and all inside one deadline: preflight (device, driver, NVRTC, cuBLAS, an sm_90a
# smoke compile), the GPU tests one process per test class (simplest kernels first, whole-model and multi-rank classes
# last), compute-sanitizer memcheck over up to two faulting classes, every GPU bench alone in its quick mode, and the
# static kernel report under this server's NVRTC. OUT receives summary.txt, summary.json and results.tgz (every log,
# TRX report, bench JSON and sanitizer report), written again after every stage, so a kill still returns what ran. The
# summary is printed last. Exit status: 0 everything ran on a device and passed, 1 something failed or timed out,
# 3 nothing ran on a device. tools/gpu/device_run.py does the work; this file holds every limit it runs under.
# DSCUDA_BUNDLE names the unpacked bundle (default: gpu-bundle in the repository root).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: bash tools/gpu/device-run.sh OUTDIR}"

# What the device tool lets a call return and run (its README): the one place these numbers live.
export DSCUDA_OUT_MAX_FILES=8            # files that come back from $OUT (we write 3)
export DSCUDA_OUT_MAX_FILE_MIB=16        # per file
export DSCUDA_OUT_MAX_TOTAL_MIB=64       # all of them together
export DSCUDA_OUT_MAX_DEPTH=2            # folders below $OUT (we write none)
export DSCUDA_COMMAND_LIMIT_S=600        # one command, unpacking included

# This run's budget inside them (seconds after the script starts; override any for a rehearsal).
export DSCUDA_DEADLINE_S="${DSCUDA_DEADLINE_S:-480}"           # everything, packing included
export DSCUDA_PREFLIGHT_S="${DSCUDA_PREFLIGHT_S:-90}"           # preflight, both tries
export DSCUDA_TESTS_UNTIL_S="${DSCUDA_TESTS_UNTIL_S:-300}"       # the test stage ends by then; sanitizer reruns too
export DSCUDA_CLASS_S="${DSCUDA_CLASS_S:-150}"                   # one test class's process
export DSCUDA_TEST_S="${DSCUDA_TEST_S:-90}"                     # one test (MSTest's per-test timeout)
export DSCUDA_SANITIZER_CLASSES="${DSCUDA_SANITIZER_CLASSES:-2}" # faulting classes re-run under memcheck
export DSCUDA_SANITIZER_S="${DSCUDA_SANITIZER_S:-120}"           # one memcheck run
export DSCUDA_BENCH_S="${DSCUDA_BENCH_S:-75}"                   # one bench
export DSCUDA_KERNELS_S="${DSCUDA_KERNELS_S:-120}"               # run-bench kernels for sm_90a
export DSCUDA_RESERVE_S="${DSCUDA_RESERVE_S:-15}"                # kept back for the last packing

python="$(command -v python3 || true)"
if [ -z "$python" ]; then
  # Without Python there is no summary; say so where the call's output tail shows it.
  mkdir -p "$out"
  echo "device-run: python3 is required (the GPU server's image has it) and is not on PATH" | tee "$out/summary.txt" >&2
  exit 3
fi
export PYTHONUNBUFFERED=1
exec "$python" "$here/device_run.py" "$out"
