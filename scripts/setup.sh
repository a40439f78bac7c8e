#!/usr/bin/env bash
# Set up dicom-node on a fresh Debian machine: system packages and a virtual environment.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in orthanc orthanc-dicomweb dcmtk dicom3tools libpixelmed-java default-jre-headless systemd openssl \
           chromium python3.11-venv libpython3.11; do  # the last two: the test tritonserver (below)
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# npm fetches the web viewer; a Node.js that brings its own npm (NodeSource) is kept as it is
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian package starts an Orthanc service on 4242/8042; dicom-node starts its own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    $SUDO systemctl stop orthanc || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtual environment .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.dicom-node-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv (torch pinned to the CPU build 2.13.0)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# The test Triton Inference Server (tests/triton_server.py): PyPI nvidia-pytriton ships
# tritonserver 2.51 with the Python backend. Its Python-backend stub is linked against
# libpython3.11.so.1.0 and runs in the interpreter of its own virtual environment; it
# works with Debian's /usr/bin/python3.11 (and fails with pyenv's 3.11.7), so the server
# gets .venv-triton made from that interpreter.
TRITON_PY=${TRITON_PYTHON:-/usr/bin/python3.11}
if [ ! -x .venv-triton/bin/python ] && [ -x "$TRITON_PY" ]; then
  echo "setup: creating .venv-triton (tritonserver for the tests) from $TRITON_PY"
  "$TRITON_PY" -m venv .venv-triton
fi
if [ -x .venv-triton/bin/python ] && [ ! -f .venv-triton/.installed ]; then
  .venv-triton/bin/python -m pip install -q "nvidia-pytriton==0.7.0" "onnxruntime==1.32.0" "numpy==1.26.4"
  touch .venv-triton/.installed
fi
[ -x .venv-triton/bin/python ] || echo "setup: WARNING no $TRITON_PY: the Triton tests cannot start a tritonserver (apt-get install python3.11 python3.11-venv)"
# The web viewer (`dicom-node demo --viewer`, the `viewer` tests): OHIF's built viewer
# (package/dist of the npm package @ohif/app) and puppeteer-core (drives Debian's
# chromium; no browser download), both from the npm registry into viewer-assets/
# (gitignored). Nothing is fetched at run time.
OHIF_VERSION=3.13.2
PUPPETEER_VERSION=24.43.1
assets=viewer-assets
if [ ! -f "$assets/ohif/index.html" ] || [ "$(cat "$assets/ohif/.version" 2>/dev/null)" != "$OHIF_VERSION" ]; then
  echo "setup: fetching the OHIF viewer $OHIF_VERSION (npm pack @ohif/app)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null && tar xzf ohif-app-*.tgz)
  rm -rf "$assets/ohif"; mkdir -p "$assets"
  mv "$tmp/package/dist" "$assets/ohif"
  echo "$OHIF_VERSION" > "$assets/ohif/.version"
  rm -rf "$tmp"
fi
if [ ! -f "$assets/node_modules/puppeteer-core/package.json" ] || \
   ! grep -q "\"version\": \"$PUPPETEER_VERSION\"" "$assets/node_modules/puppeteer-core/package.json"; then
  echo "setup: installing puppeteer-core $PUPPETEER_VERSION (npm) for the browser tests"
  PUPPETEER_SKIP_DOWNLOAD=1 npm install --silent --no-audit --no-fund --prefix "$assets" \
    "puppeteer-core@$PUPPETEER_VERSION" >/dev/null
fi
echo "setup: ready (.venv/bin/dicom-node)"
