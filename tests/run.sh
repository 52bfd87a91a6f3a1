#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
# Usage: bash tests/run.sh [pytest args...]      (USFMD_SKIP_APT=1 skips the apt step)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for bin in /usr/bin/storescu /usr/bin/dcmsend /usr/bin/dciodvfy /usr/bin/dsrdump /usr/sbin/Orthanc; do
  [ -x "$bin" ] || need_apt=(dcmtk dicom3tools orthanc orthanc-dicomweb)
done
if [ "${#need_apt[@]}" -gt 0 ] && [ "${USFMD_SKIP_APT:-0}" != "1" ]; then
  echo "== installing DICOM peers: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# PostgreSQL on 127.0.0.1:5432 backs the second DB backend of the suite.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing usfmd with test extras"
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

echo "== lint and types"
.venv/bin/ruff check daemon pipelines training migrations tests
.venv/bin/ruff format --check daemon pipelines training migrations tests
.venv/bin/mypy

echo "== tests (unit + integration with dcmtk, Orthanc, PostgreSQL)"
export TCP_NODELAY=1
exec .venv/bin/pytest "$@"
