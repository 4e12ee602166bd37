#!/usr/bin/env bash
# Install test dependencies and run every test (the README's second command).
#   apt: the real NBD peers (qemu-img/qemu-io/qemu-nbd, qemu-system-x86 and
#        qemu-storage-daemon, nbdinfo/nbdcopy/nbdsh, python3-libnbd, nbdkit, fio)
#   pip: the package itself (builds the C data path) and its test extras
set -euo pipefail
cd "$(dirname "$0")"

pkgs=(make systemd qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit fio gcc python3-dev python3-venv)
.ci/ensure-debs "${pkgs[@]}"

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
"$VENV/bin/pip" install -q '.[test]'

export FLEECED_REQUIRE_TOOLS=${FLEECED_REQUIRE_TOOLS:-1}

echo "== C unit tests (plain and ASan+UBSan)"
make -s -C native test
make -s -C native asan

echo "== lint"
"$VENV/bin/ruff" check daemon tests bench
"$VENV/bin/mypy" --strict daemon/fleeced

echo "== pytest"
# Run from outside the source tree so the installed package (with its built
# C module) is what gets imported.  Exit 5 (no tests collected) fails too.
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@" tests
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
