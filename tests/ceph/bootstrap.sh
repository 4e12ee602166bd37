#!/bin/bash
# One-node Ceph (Debian 12 packages, Pacific 16.2) for the RBD tests: 1 mon, 1 mgr, 1 OSD,
# a size-1 pool "rbd" and a 64 MiB image rbd/img. Root, no systemd, loopback only.
#   apt-get install -y --no-install-recommends ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados
#   BASE=/tmp/ceph-mini/c STORE=memstore|bluestore ./bootstrap.sh   -> prints "export CEPH_CONF=..."
#   teardown: BASE=... ./teardown.sh (kills the pids in $BASE/run/*.pid, removes $BASE)
set -euo pipefail
BASE=${BASE:-/tmp/ceph-mini/c}
STORE=${STORE:-memstore}          # memstore: RAM only; bluestore: a sparse 1 GiB file
PORT=${PORT:-3300}                # msgr2 port of the mon (OSD/mgr take 6800-7300)
T0=${EPOCHREALTIME/./}
step() { local t=$(( ${EPOCHREALTIME/./} - T0 )); printf '[%3d.%02ds] %s\n' $((t/1000000)) $((t%1000000/10000)) "$*"; }

[ -e "$BASE" ] && { echo "$BASE exists; tear it down first" >&2; exit 1; }
mkdir -p "$BASE"/{mon/ceph-a,mgr/ceph-x,osd/ceph-0,run,log}
FSID=$(cat /proc/sys/kernel/random/uuid); CONF=$BASE/ceph.conf
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon initial members = a
mon host = v2:127.0.0.1:$PORT
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $BASE/run
admin socket = $BASE/run/\$name.asok
pid file = $BASE/run/\$name.pid
log file = $BASE/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
auth allow insecure global id reclaim = false
[client]
keyring = $BASE/\$cluster.\$name.keyring
[mon]
mon data = $BASE/mon/ceph-\$id
keyring = $BASE/mon/ceph-\$id/keyring
[mgr]
mgr data = $BASE/mgr/ceph-\$id
keyring = $BASE/mgr/ceph-\$id/keyring
mgr initial modules =
[osd]
osd data = $BASE/osd/ceph-\$id
keyring = $BASE/osd/ceph-\$id/keyring
osd objectstore = $STORE
osd memory target = 939524096
memstore device bytes = 1073741824
bluestore block create = true
bluestore block size = 1073741824
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 1
osd op num threads per shard = 2
EOF
export CEPH_CONF=$CONF
C() { timeout 60 ceph --connect-timeout 30 "$@"; }

# keys: mon., client.admin
ceph-authtool --create-keyring "$BASE/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$BASE/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$BASE/mon.keyring" --import-keyring "$BASE/ceph.client.admin.keyring" >/dev/null

# monitor
monmaptool --create --enable-all-features --set-min-mon-release 16 \
  --addv a "[v2:127.0.0.1:$PORT]" --fsid "$FSID" "$BASE/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$BASE/monmap" --keyring "$BASE/mon.keyring"
ceph-mon -i a                                  # daemonizes
step "mon started"
C -s >/dev/null
step "mon answers"

# manager (needed for 'ceph -s' PG stats / health; rbd I/O works without it)
C auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  -o "$BASE/mgr/ceph-x/keyring"
ceph-mgr -i x
step "mgr started"

# one OSD
OSD_UUID=$(cat /proc/sys/kernel/random/uuid); OSD_KEY=$(ceph-authtool --gen-print-key)
echo "{\"cephx_secret\": \"$OSD_KEY\"}" >"$BASE/osd-secrets.json"
ID=$(C osd new "$OSD_UUID" -i "$BASE/osd-secrets.json")
[ "$ID" = 0 ] || { echo "unexpected osd id $ID" >&2; exit 1; }
ceph-authtool --create-keyring "$BASE/osd/ceph-0/keyring" --name osd.0 --add-key "$OSD_KEY" >/dev/null
ceph-osd -i 0 --mkfs --osd-uuid "$OSD_UUID" 2>&1 | grep -v -E '^$|warning: unable to create' || true
ceph-osd -i 0
step "osd started ($STORE)"
for i in $(seq 120); do C osd stat -f json | grep -q '"num_up_osds":1' && break; sleep 0.5; done
C osd stat -f json | grep -q '"num_up_osds":1' || { echo "OSD did not come up" >&2; exit 1; }
step "osd up"

# pool + image
C osd pool create rbd 8 8 replicated >/dev/null 2>&1
C osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
C osd pool application enable rbd rbd >/dev/null 2>&1
timeout 120 rbd pool init rbd
timeout 60 rbd create rbd/img --size 64M
step "pool rbd + image rbd/img ready"
C health
echo "export CEPH_CONF=$CONF"
