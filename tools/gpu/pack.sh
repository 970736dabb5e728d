#!/usr/bin/env bash
# Publishes the test project and run-bench self-contained for linux-x64 (no .NET needed on the GPU server) together
# with the shared fixtures into gpu-bundle/, and packs it as gpu-bundle.tar.gz (both ignored by git). The
# tarball is what travels (well under the device tool's 64 MiB carry limit; the unpacked folder is not):
#   carry gpu-bundle.tar.gz, then on the server, in the repository root:
#   tar xzf gpu-bundle.tar.gz && bash tools/gpu/device-run.sh "$OUT"
# DSCUDA_BUNDLE_OUT: the folder to write gpu-bundle/ and gpu-bundle.tar.gz into (default: the repository root).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${DSCUDA_BUNDLE_OUT:-$repo}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
out="$dest/gpu-bundle"
shared="${DSCUDA_SHARED:-$repo/../shared}"
trim="${DSCUDA_TRIM:-1}"

# No build server or reused MSBuild node may outlive the publish: one would keep the caller's output pipe open
# (a test that runs this script would wait for its end forever).
export MSBUILDDISABLENODEREUSE=1 DOTNET_CLI_USE_MSBUILD_SERVER=0 UseSharedCompilation=false

rm -rf "$out"
# A previous publish with other trimming settings leaves trimmed assemblies that an incremental publish reuses.
rm -rf "$repo"/Tests/obj/Release/net10.0/linux-x64 "$repo"/Tests/bin/Release/net10.0/linux-x64
mkdir -p "$out/tests"
args=(-c Release -r linux-x64 --self-contained -p:InvariantGlobalization=true -p:GenerateDocumentationFile=false -o "$out/tests")
if [ "$trim" = "1" ]; then
  # The test assembly is reflected over by MSTest; keep it (and what it references) whole. Tests serialize test
  # data with reflection-based System.Text.Json, which trimming switches off unless asked to keep it.
  args+=(-p:PublishTrimmed=true -p:TrimMode=partial -p:SuppressTrimAnalysisWarnings=true -p:TreatWarningsAsErrors=false
         -p:TrimmerRootAssembly=DeepSeekCuda.Tests -p:JsonSerializerIsReflectionEnabledByDefault=true)
fi
dotnet publish "$repo/Tests/DeepSeekCuda.Tests.csproj" "${args[@]}"
# run-bench beside it, trimmed on its own (its roots differ from the tests'); its JSON is source-generated.
bench_args=(-c Release -r linux-x64 --self-contained -p:InvariantGlobalization=true -p:GenerateDocumentationFile=false -o "$out/bench")
if [ "$trim" = "1" ]; then
  bench_args+=(-p:PublishTrimmed=true -p:TrimMode=partial -p:SuppressTrimAnalysisWarnings=true -p:TreatWarningsAsErrors=false)
fi
rm -rf "$repo"/tools/run-bench/obj/Release/net10.0/linux-x64 "$repo"/tools/run-bench/bin/Release/net10.0/linux-x64
dotnet publish "$repo/tools/run-bench/run-bench.csproj" "${bench_args[@]}"

# Only what the tests read: fixtures and tokenizers.
mkdir -p "$out/shared"
for d in fixtures tokenizers; do
  if [ -d "$shared/$d" ]; then cp -r "$shared/$d" "$out/shared/"; fi
done
{ git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown; } > "$out/COMMIT"
if ! git -C "$repo" diff --quiet HEAD 2>/dev/null; then echo "dirty" >> "$out/COMMIT"; fi

tarball="$dest/gpu-bundle.tar.gz"
tmp="$(mktemp "$dest/.gpu-bundle.XXXXXX")"
tar -C "$dest" -czf "$tmp" gpu-bundle
mv "$tmp" "$tarball"
echo "gpu-bundle: $(du -sm "$out" | cut -f1) MiB ($(du -sm "$out/tests" | cut -f1) MiB tests, $(du -sm "$out/shared" | cut -f1) MiB shared)"
echo "compressed: $(du -sm "$tarball" | cut -f1) MiB ($tarball): carry this file"
if [ "$(du -sm "$tarball" | cut -f1)" -ge 64 ]; then
  echo "error: the compressed bundle is over the 64 MiB carry limit" >&2
  exit 1
fi
