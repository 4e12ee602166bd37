#!/usr/bin/env bash
# Install test dependencies and run every test (the README's second command).
#   apt: the real NBD peers (qemu-img/qemu-io/qemu-nbd, qemu-system-x86 and
#        qemu-storage-daemon, nbdinfo/nbdcopy/nbdsh, python3-libnbd, nbdkit, fio),
#        libnbd-dev (the C data path's NBD upstream), Ceph for the RBD tests,
#        libvirtd for the libvirt tests, prometheus for the metrics test
#   pip: the package itself (builds the C data path) and its test extras
#   .ci/deb-package installs the Debian packaging tools it needs itself
set -euo pipefail
cd "$(dirname "$0")"

pkgs=(make systemd qemu-utils qemu-system-x86 libnbd-bin libnbd-dev python3-libnbd nbdkit fio gcc python3-dev python3-venv gnutls-bin openssl util-linux)
.ci/ensure-debs "${pkgs[@]}"
# A one-node Ceph cluster for the RBD tests (tests/ceph/bootstrap.sh) and
# QEMU's rbd driver; libvirtd for the libvirt tests, and what pip needs to
# build libvirt-python; Prometheus for the metrics test (started by the test
# itself, never as the system service); all without the recommends (the
# mgr's modules, ...).
.ci/ensure-debs --no-install-recommends qemu-block-extra ceph-mon ceph-mgr ceph-osd ceph-common \
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config prometheus

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
"$VENV/bin/ruff" check debian/manpages.py .ci/deb-smoke
"$VENV/bin/mypy" --strict debian/manpages.py .ci/deb-smoke

echo "== Debian package (build, lintian, apt-get install, smoke test of the installed files, purge)"
# Purged again at the end: the tests below use the virtualenv only.
.ci/deb-package

echo "== daemon under ASan+UBSan (lifetimes: vanishing clients, fleece-stop, SIGTERM, VM attach, kill -9 + restart)"
# A second venv whose C module is built with sanitizers; only the daemon
# processes run with the ASan runtime preloaded (the client tools do not).
# The in-tree build/ directory is removed around it so neither build reuses
# the other's objects.
ASAN_VENV=${ASAN_VENV:-.venv-asan}
[ -x "$ASAN_VENV/bin/python" ] || "$PY" -m venv "$ASAN_VENV"
"$ASAN_VENV/bin/pip" install -q --upgrade pip >/dev/null
rm -rf build
FLEECED_SANITIZE=1 "$ASAN_VENV/bin/pip" install -q --no-cache-dir --force-reinstall '.[test]'
rm -rf build
"$VENV/bin/pip" install -q --force-reinstall --no-deps .
rm -rf build
FLEECED_DAEMON_PRELOAD="$(gcc -print-file-name=libasan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$ASAN_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/integration/test_lifecycle.py tests/integration/test_cbw_hardening.py \
    tests/integration/test_attach.py tests/integration/test_state.py \
    tests/integration/test_bitmaps.py \
    "tests/integration/test_soak.py::test_disconnect_mid_pipeline_then_fleece_stop" \
    "tests/integration/test_soak.py::test_stalled_snapshot_readers_fleece_stop_and_sigterm" \
    "tests/integration/test_soak.py::test_sigterm_while_guests_write"

echo "== pytest"
# Run from outside the source tree so the installed package (with its built
# C module) is what gets imported.  Exit 5 (no tests collected) fails too.
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@" tests
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
