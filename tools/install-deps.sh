#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages pyramid builds and tests with. Idempotent.
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config python3
          libsentencepiece-dev doctest-dev nlohmann-json3-dev
          # the bindings (bindings/): SWIG, then Python, Java (JDK, JUnit 4) and Go
          swig python3-dev python3-pytest default-jdk-headless junit4 golang-go)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "pyramid: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
