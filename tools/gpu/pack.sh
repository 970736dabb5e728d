#!/usr/bin/env bash
# Publishes the test project self-contained for linux-x64 (no .NET needed on the GPU server) together
# with the shared fixtures into gpu-bundle/. Copy that folder to the server and run gpu-bundle/run.sh OUTDIR.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$repo/gpu-bundle"
shared="${DSCUDA_SHARED:-$repo/../shared}"
trim="${DSCUDA_TRIM:-1}"

rm -rf "$out"
# A previous publish with other trimming settings leaves trimmed assemblies that an incremental publish reuses.
rm -rf "$repo"/Tests/obj/Release/net10.0/linux-x64 "$repo"/Tests/bin/Release/net10.0/linux-x64
mkdir -p "$out/tests"
args=(-c Release -r linux-x64 --self-contained -p:InvariantGlobalization=true -p:GenerateDocumentationFile=false -o "$out/tests")
if [ "$trim" = "1" ]; then
  # The test assembly is reflected over by MSTest; keep it (and what it references) whole.
  args+=(-p:PublishTrimmed=true -p:TrimMode=partial -p:SuppressTrimAnalysisWarnings=true -p:TreatWarningsAsErrors=false
         -p:TrimmerRootAssembly=DeepSeekCuda.Tests)
fi
dotnet publish "$repo/Tests/DeepSeekCuda.Tests.csproj" "${args[@]}"

# Only what the tests read: fixtures and tokenizers.
mkdir -p "$out/shared"
for d in fixtures tokenizers; do
  if [ -d "$shared/$d" ]; then cp -r "$shared/$d" "$out/shared/"; fi
done
cp "$repo/tools/gpu/run.sh" "$out/run.sh"
chmod +x "$out/run.sh"
{ git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown; } > "$out/COMMIT"
if ! git -C "$repo" diff --quiet HEAD 2>/dev/null; then echo "dirty" >> "$out/COMMIT"; fi

tmp="$(mktemp)"
tar -C "$repo" -czf "$tmp" gpu-bundle
mv "$tmp" "$out/gpu-bundle.tar.gz"
size=$(( $(du -sm "$out" | cut -f1) - $(du -sm "$out/gpu-bundle.tar.gz" | cut -f1) ))
echo "compressed: $(du -sm "$out/gpu-bundle.tar.gz" | cut -f1) MiB ($out/gpu-bundle.tar.gz)"
echo "gpu-bundle: ${size} MiB ($(du -sm "$out/tests" | cut -f1) MiB tests, $(du -sm "$out/shared" | cut -f1) MiB shared)"
if [ "$size" -ge 64 ]; then
  echo "warning: the bundle is over 64 MiB; compress it (tar czf) before copying" >&2
fi
