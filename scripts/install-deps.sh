#!/usr/bin/env bash
# Installs the Debian packages Kraken builds and runs with (needs root; safe to run again).
# The CUDA toolkit is not installed here: where /usr/local/cuda exists the build uses it.
set -euo pipefail
packages=(cmake ninja-build g++ make pkg-config
  openmpi-bin libopenmpi-dev
  libtomlplusplus-dev libcli11-dev libfmt-dev nlohmann-json3-dev
  libopenblas0-openmp libopenblas0-pthread libopenblas-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3)
# node and npm fetch the demo vocabulary and corpus; a machine may already have them from elsewhere.
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all packages present"
fi
