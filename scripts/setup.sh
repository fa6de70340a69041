#!/usr/bin/env bash
# Set up srnode on a fresh Debian machine: system tools, a virtual environment .venv at the
# repository root, and srnode installed in it (editable). Safe to run again (it reuses .venv).
#
#   SRNODE_SKIP_APT=1   skip the Debian packages (dcmtk, dicom3tools, orthanc, chromium) if you
#                       have them (chromium: the console's browser tests drive /usr/bin/chromium)
#   SRNODE_TORCH=...    pip requirement for torch (default: torch==2.13.0 from wherever pip
#                       finds it: a CUDA build from PyPI on Linux x86_64, a CPU build where a
#                       +cpu wheel is offered first). Choose explicitly, e.g.
#                       SRNODE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#                       (or .../whl/cu128), or install torch into .venv before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SRNODE_SKIP_APT:-0}" != "1" ]; then
  need=""
  command -v storescu >/dev/null 2>&1 || need="$need dcmtk"
  command -v dciodvfy >/dev/null 2>&1 || need="$need dicom3tools"
  command -v Orthanc >/dev/null 2>&1 || need="$need orthanc"
  [ -x /usr/bin/chromium ] || need="$need chromium"
  if [ -n "$need" ]; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
    # Debian starts an Orthanc service on install; srnode's tests start their own instances.
    (command -v service >/dev/null && $SUDO service orthanc stop >/dev/null 2>&1) || true
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${SRNODE_TORCH:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q -e ".[test]"
echo "srnode is installed in .venv ($(.venv/bin/srnode --version 2>/dev/null || echo 'cli pending'))"
