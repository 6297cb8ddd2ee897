#!/usr/bin/env bash
# Run, on the GPU machine, the benchmark suite with the carried wheels (benchmarks/
# gpu_wheels.sh): installs them into /tmp/site, puts them and the repository on PYTHONPATH,
# then runs `gpu_suite.py --out $OUT` with the arguments given, e.g.
#   bash benchmarks/gpu_run.sh --budget 570 --only sdm_paper_bf16_compile_all,...
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G '.whl/*.whl' > /dev/null; then  # carried (carry: [".whl"]); the SDM rows need none
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_suite.py --out "${OUT:?the device tool sets OUT}" "$@"
