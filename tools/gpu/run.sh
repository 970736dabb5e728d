#!/usr/bin/env bash
# Runs on the GPU server from inside the bundle pack.sh made: the GPU tests, then the benchmarks, writing
# logs, the TRX report and gpu-tests.json into OUTDIR.
#   ./run.sh OUTDIR
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
outdir="${1:?usage: run.sh OUTDIR}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
export DSCUDA_SHARED="${DSCUDA_SHARED:-$here/shared}"
export DSCUDA_KERNEL_CACHE="${DSCUDA_KERNEL_CACHE:-$outdir/kernel-cache}"
# Logical ranks on one GPU (DeviceMesh.Logical, CudaParallel.Logical) need a hardware queue per stream, else an
# all-reduce block can spin behind a peer queued after it until its timeout; the driver reads this at cuInit.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-32}"
exe="$here/tests/DeepSeekCuda.Tests"

device="none"; driver="none"
if command -v nvidia-smi >/dev/null 2>&1; then
  device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  nvidia-smi > "$outdir/nvidia-smi.txt" 2>&1
fi
commit="$(head -n1 "$here/COMMIT" 2>/dev/null || echo unknown)"
date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# MSTest runner (Microsoft.Testing.Platform) options: --filter takes the VSTest filter syntax.
"$exe" --filter "TestCategory=Gpu" --report-trx --report-trx-filename gpu-tests.trx --results-directory "$outdir" \
  --output Detailed > "$outdir/gpu-tests.log" 2>&1
rc=$?

trx="$outdir/gpu-tests.trx"
python3 - "$trx" "$outdir/gpu-tests.json" "$device" "$driver" "$commit" "$date" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
trx, out, device, driver, commit, date, rc = sys.argv[1:]
passed = failed = skipped = 0; failures = []
try:
    ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
    for r in ET.parse(trx).getroot().iter("{%s}UnitTestResult" % ns["t"]):
        o = r.get("outcome")
        if o == "Passed": passed += 1
        elif o in ("Failed", "Error", "Timeout", "Aborted"): failed += 1; failures.append(r.get("testName"))
        else: skipped += 1  # NotExecuted / Inconclusive: no device or a test that could not run
except Exception as e:
    failures.append("no TRX report (%s); see gpu-tests.log, exit code %s" % (e, rc)); failed += 1
json.dump({"device": device, "driver": driver, "commit": commit, "date": date, "passed": passed, "failed": failed,
           "skipped": skipped, "failures": failures}, open(out, "w"), indent=2)
print(open(out).read())
PY

# Then every GPU bench (one JSON file each under OUTDIR/bench; commit them under bench/results/).
# RUN_BENCH_ARGS adds options (for example --quick); RUN_BENCH=0 skips the benches.
if [ "${RUN_BENCH:-1}" = "1" ] && [ -x "$here/bench/run-bench" ]; then
  DSCUDA_COMMIT="$commit" "$here/bench/run-bench" all --out "$outdir/bench" ${RUN_BENCH_ARGS:-} 2>&1 | tee "$outdir/bench.log" | tail -n 5 \
    || echo "run-bench failed, see bench.log"
fi
exit $rc
