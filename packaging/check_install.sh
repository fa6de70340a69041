#!/usr/bin/env bash
# Production-install check (run by .ci/run after the test suite):
#   1. build the wheel of this checkout (pip wheel --no-deps),
#   2. install it WITHOUT extras into a fresh virtual environment (no system site packages,
#      no test extra, no Debian Orthanc): torch first (SRNODE_TORCH, default torch==2.13.0),
#   3. run `srnode serve` from that environment, outside the source tree, and check that it
#      answers C-ECHO (dcmtk echoscu, else `srnode echo`) and GET /healthz with 200,
#   4. check packaging/srnode.service with `systemd-analyze verify` where available.
#
#   PYTHON=...         interpreter for the new environment (default: the one behind .venv)
#   SRNODE_TORCH=...   pip requirement for torch (default torch==2.13.0)
#   KEEP=1             keep the temporary folder (printed) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=$(.venv/bin/python -c "import sys; print(sys._base_executable)")
  else
    PYTHON=python3
  fi
fi
TMP=$(mktemp -d /tmp/srnode-install.XXXXXX)
SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = "1" ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
# pip, quiet (the local index prints a warning per missing folder; keep real errors)
pipq() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
fail() { echo "check_install: FAILED: $*" >&2; [ -f "$TMP/serve.log" ] && tail -40 "$TMP/serve.log" >&2; exit 1; }

echo "check_install: building the wheel"
"$PYTHON" -m venv "$TMP/build-venv"
pipq "$TMP/build-venv/bin/python" -m pip install -q "setuptools>=65" wheel
pipq "$TMP/build-venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$TMP/dist" "$REPO"
WHEEL=$(ls "$TMP"/dist/*.whl)

echo "check_install: installing $(basename "$WHEEL") without extras into a fresh venv"
"$PYTHON" -m venv "$TMP/venv"
# shellcheck disable=SC2086
pipq "$TMP/venv/bin/python" -m pip install -q ${SRNODE_TORCH:-torch==2.13.0}
pipq "$TMP/venv/bin/python" -m pip install -q "$WHEEL"
cd "$TMP"  # never import from the source tree
unset PYTHONPATH
"$TMP/venv/bin/python" - <<'PY' || fail "the installed environment is not a clean production install"
import importlib.util, sys, dicom_node
assert dicom_node.__file__.startswith(sys.prefix), dicom_node.__file__
for extra in ("pytest", "hypothesis"):
    assert importlib.util.find_spec(extra) is None, f"{extra} installed without the test extra"
PY

free_port() { "$TMP/venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
DICOM_PORT=$(free_port)
HTTP_PORT=$(free_port)
mkdir -p "$TMP/etc" "$TMP/var"
cat > "$TMP/etc/config.toml" <<EOF
[node]
ae_title = "SRNODE"
host = "127.0.0.1"
port = $DICOM_PORT
storage_dir = "$TMP/var/storage"
database_url = "sqlite:///$TMP/var/srnode.db"
audit_log = "$TMP/var/audit.log"
min_free_disk_mb = 1
warn_free_disk_mb = 0

[http]
host = "127.0.0.1"
port = $HTTP_PORT
EOF

echo "check_install: srnode serve on DICOM port $DICOM_PORT, HTTP port $HTTP_PORT"
"$TMP/venv/bin/srnode" serve --config "$TMP/etc/config.toml" >"$TMP/serve.log" 2>&1 &
SERVE_PID=$!
# dcmtk's echoscu, not a Python script of the same name (pynetdicom installs one into any venv
# that may be first on PATH)
ECHOSCU=""
for candidate in $(type -ap echoscu); do
  if [ "$(head -c 2 "$candidate")" != "#!" ]; then ECHOSCU="$candidate"; break; fi
done
ok=""
for _ in $(seq 1 120); do
  kill -0 "$SERVE_PID" 2>/dev/null || fail "srnode serve exited"
  if [ -n "$ECHOSCU" ]; then
    "$ECHOSCU" -aec SRNODE -to 5 127.0.0.1 "$DICOM_PORT" >/dev/null 2>&1 && ok=1
  else
    "$TMP/venv/bin/srnode" echo --config "$TMP/etc/config.toml" --timeout 5 \
      "SRNODE@127.0.0.1:$DICOM_PORT" >/dev/null 2>&1 && ok=1
  fi
  [ -n "$ok" ] && break
  sleep 0.5
done
[ -n "$ok" ] || fail "no C-ECHO answer"
echo "check_install: C-ECHO answered"
code=""
for _ in $(seq 1 60); do
  code=$("$TMP/venv/bin/python" - "$HTTP_PORT" <<'PY' || true
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=60) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("down")
PY
)
  [ "$code" = "200" ] && break
  sleep 1
done
[ "$code" = "200" ] || fail "/healthz answered $code"
echo "check_install: /healthz 200"
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" || fail "srnode serve did not stop cleanly on SIGTERM"
SERVE_PID=""

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify the shipped unit, pointing ExecStart at the environment just installed
  sed "s#/opt/srnode/bin/srnode#$TMP/venv/bin/srnode#" "$REPO/packaging/srnode.service" \
    > "$TMP/srnode.service"
  out=$(systemd-analyze verify "$TMP/srnode.service" 2>&1) || fail "systemd-analyze: $out"
  # unknown keys are only warnings for systemd: treat any remark as a failure
  [ -z "$out" ] || fail "systemd-analyze: $out"
  echo "check_install: systemd-analyze verify clean"
else
  echo "check_install: systemd-analyze not available, unit not verified"
fi
echo "check_install: OK"
