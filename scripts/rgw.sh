#!/usr/bin/env bash
# A single-node Ceph RGW (S3) on 127.0.0.1 for tests and benchmarks: one mon, one memstore OSD,
# radosgw with the beast frontend; no systemd, no mgr, no cephx (loopback only). Installs the
# Debian packages (radosgw ceph-mon ceph-osd ceph-common) if they are missing.
#   scripts/rgw.sh start DIR   # prints one JSON line: endpoint, keys, pids, seconds
#   scripts/rgw.sh stop DIR    # stops exactly the pids recorded in DIR/pids
# Data lives in RAM (memstore): a stop loses it. Ports are picked free at start.
set -euo pipefail
cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: scripts/rgw.sh start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
ACCESS_KEY="${RGW_ACCESS_KEY:-kvstrata-rgw}"
SECRET_KEY="${RGW_SECRET_KEY:-kvstrata-rgw-secret}"

stop() {
    [ -f "$dir/pids" ] || return 0
    # reverse start order: radosgw, osd, mon; only pids that still run a ceph binary
    for pid in $(tac "$dir/pids"); do
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -Eq '^[^ ]*(ceph-mon|ceph-osd|radosgw) '; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
            [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/pids"
}

if [ "$cmd" = "stop" ]; then stop; exit 0; fi
[ "$cmd" = "start" ] || { echo "usage: scripts/rgw.sh start|stop DIR" >&2; exit 2; }

if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v ceph-mon >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        radosgw ceph-mon ceph-osd ceph-common >&2
fi

t0=$EPOCHREALTIME
stop
rm -rf "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"
mkdir -p "$dir/mon" "$dir/osd/ceph-0" "$dir/run" "$dir/log"
read -r MON_PORT RGW_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
FSID="$(python3 -c 'import uuid; print(uuid.uuid4())')"
CONF="$dir/ceph.conf"
cat > "$CONF" <<EOF
[global]
fsid = $FSID
mon initial members = a
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
# without cephx, radosgw loops on "get_initial_auth_request returned -13" unless crc is allowed
ms mon client mode = crc secure
ms mon cluster mode = crc secure
ms mon service mode = crc secure
ms cluster mode = crc secure
ms service mode = crc secure
ms client mode = crc secure
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd crush chooseleaf type = 0
paxos propose interval = 0.01
mon data = $dir/mon/\$cluster-\$id
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 2147483648
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
keyring = $dir/keyring
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $dir/rgw
rgw dns name = 127.0.0.1
EOF
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$MON_PORT]" --fsid "$FSID" "$dir/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" 2>>"$dir/log/setup.log"
setsid ceph-mon -c "$CONF" -i a -f >>"$dir/log/mon.out" 2>&1 < /dev/null &
echo $! >> "$dir/pids"

# one ceph process for every mon command (each CLI start costs ~0.5 s)
OSD_UUID="$(python3 -c 'import uuid; print(uuid.uuid4())')"
ceph -c "$CONF" --connect-timeout 20 osd new "$OSD_UUID" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" 2>>"$dir/log/setup.log" >/dev/null
setsid ceph-osd -c "$CONF" -i 0 -f >>"$dir/log/osd.out" 2>&1 < /dev/null &
echo $! >> "$dir/pids"
ceph -c "$CONF" >/dev/null 2>>"$dir/log/setup.log" <<EOF
osd pool create .rgw.root 8
osd pool create default.rgw.control 8
osd pool create default.rgw.meta 8
osd pool create default.rgw.log 8
osd pool create default.rgw.buckets.index 8
osd pool create default.rgw.buckets.data 8
osd pool create default.rgw.buckets.non-ec 8
osd pool application enable .rgw.root rgw
osd pool application enable default.rgw.control rgw
osd pool application enable default.rgw.meta rgw
osd pool application enable default.rgw.log rgw
osd pool application enable default.rgw.buckets.index rgw
osd pool application enable default.rgw.buckets.data rgw
osd pool application enable default.rgw.buckets.non-ec rgw
EOF
mkdir -p "$dir/rgw"
setsid radosgw -c "$CONF" -n client.rgw.a -f >>"$dir/log/rgw.out" 2>&1 < /dev/null &
echo $! >> "$dir/pids"
radosgw-admin -c "$CONF" -n client.rgw.a user create --uid kvstrata --display-name kvstrata \
    --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" >/dev/null 2>>"$dir/log/setup.log"
for _ in $(seq 300); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$RGW_PORT/', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$RGW_PORT/', timeout=2)" || {
    echo "rgw.sh: radosgw did not answer on 127.0.0.1:$RGW_PORT; logs in $dir/log" >&2; stop; exit 1; }
seconds="$(awk "BEGIN{print $EPOCHREALTIME - $t0}")"
printf '{"endpoint": "http://127.0.0.1:%s", "access_key": "%s", "secret_key": "%s", "pids": [%s], "seconds": %s}\n' \
    "$RGW_PORT" "$ACCESS_KEY" "$SECRET_KEY" "$(paste -sd, "$dir/pids")" "$seconds" | tee "$dir/rgw.json"
