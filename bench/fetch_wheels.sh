#!/usr/bin/env bash
# The pure-Python packages the GPU machine lacks (it has no network), as wheels in .whl/ (ignored by
# git). Run here, then carry .whl to the device machine; bench/gpu.sh installs them.
#   bench/fetch_wheels.sh            # Python 3.12 (the device machine's), x86-64
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
rm -rf .whl && mkdir -p .whl
for pkg in trl==1.16.0 liger-kernel==0.8.5 torchao==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
du -sh .whl
