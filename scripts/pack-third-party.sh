#!/usr/bin/env bash
# Assembles third_party/ (git-ignored) from this machine's Debian packages, for machines without system
# packages (the GPU machines): the header-only dependencies and GoogleTest's sources, laid out as
# CMakeLists.txt and tests/CMakeLists.txt look for them under -DKRAKEN_THIRD_PARTY=<folder>:
#   third_party/include/toml++      (libtomlplusplus-dev; used header-only there, TOML_HEADER_ONLY=1)
#   third_party/include/CLI         (libcli11-dev, header-only)
#   third_party/include/nlohmann    (nlohmann-json3-dev, header-only)
#   third_party/googletest          (googletest: /usr/src/googletest, built from source there)
# About 6 MB; the device tool takes it along with carry=["third_party"]. See tools/README.md.
#
#   scripts/pack-third-party.sh [destination]     (default: third_party in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/third_party}"

need() {
  if [[ ! -e "$1" ]]; then
    echo "pack-third-party: $1 is missing (install $2, see scripts/install-deps.sh)" >&2
    exit 1
  fi
}
need /usr/include/toml++/toml.h libtomlplusplus-dev
need /usr/include/CLI/CLI.hpp libcli11-dev
need /usr/include/nlohmann/json.hpp nlohmann-json3-dev
need /usr/src/googletest/CMakeLists.txt googletest

rm -rf "$dest"
mkdir -p "$dest/include"
cp -a /usr/include/toml++ /usr/include/CLI /usr/include/nlohmann "$dest/include/"
cp -a /usr/src/googletest "$dest/googletest"

{
  echo "Assembled by scripts/pack-third-party.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) from:"
  for pkg in libtomlplusplus-dev libcli11-dev nlohmann-json3-dev googletest; do
    dpkg-query -W -f='  ${Package} ${Version}\n' "$pkg" 2>/dev/null || echo "  $pkg (version unknown)"
  done
} > "$dest/SOURCES.txt"

echo "pack-third-party: $(du -sh "$dest" | cut -f1) in $dest"
