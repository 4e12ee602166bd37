#!/usr/bin/env bash
# Install fleeced and run the main job: the fleecing demo (README command 1).
set -euo pipefail
cd "$(dirname "$0")"
pkgs=(qemu-utils qemu-system-x86 libnbd-bin libnbd-dev gcc python3-dev python3-venv util-linux)
.ci/ensure-debs "${pkgs[@]}"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q .
exec "$VENV/bin/fleeced" demo "$@"
