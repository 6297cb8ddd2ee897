#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (braceexpand, pydicom, PyYAML,
# webdataset: the data-loading rows need them; the SDM training rows need only torch, numpy,
# safetensors and tqdm, which the device image has, with pyarrow ...), into .whl/ at the repository
# root, ignored by git; the device call carries them (carry: [".whl"]) and
# benchmarks/gpu_run.sh installs them there. Python 3.12, x86-64 manylinux, as the device's.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  braceexpand==0.1.7 pydicom==3.0.2 pyyaml==6.0.4 webdataset==1.0.2
ls .whl
