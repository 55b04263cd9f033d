#!/usr/bin/env bash
# Three instances of the example service (examples/capture/service.py), each writing plain SQL to
# its own SQLite file, kept in sync through capture. Needs `nats-server` on PATH (or
# NATS_SERVER_BIN) and a built `jetsync-applier` (`cargo build -p jetsync-applier`).
#
#   examples/capture/walkthrough.sh [writes per service, default 2000]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
applier=${JETSYNC_APPLIER:-$root/target/debug/jetsync-applier}
nats=${NATS_SERVER_BIN:-nats-server}
writes=${1:-2000}
port=${NATS_PORT:-4333}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$nats" -js -a 127.0.0.1 -p "$port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
until (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done

# Atomic batches (one local transaction = one atomic transaction) need nats-server >= 2.12.1.
version=$("$nats" --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1)
atomic=$(python3 -c "import sys; print('true' if tuple(map(int, sys.argv[1].split('.'))) >= (2, 12, 1) else 'false')" "$version")
echo "nats-server $version: capture.atomic = $atomic"

for i in 1 2 3; do
    dir="$work/svc-$i"
    mkdir -p "$dir"
    cat >"$dir/jetsync.toml" <<TOML
instance = "svc-$i"
data_dir = "$dir"

[nats]
url = "nats://127.0.0.1:$port"

[stream]
name = "SVC"
subject_prefix = "svc"
history = 64

[tables.items]
key = "id"
capture = true

[capture]
atomic = $atomic

[sink]
kind = "sqlite"
TOML
    python3 "$here/service.py" "$dir/svc-$i.db" --init >/dev/null
    "$applier" --config "$dir/jetsync.toml" capture install
    "$applier" --config "$dir/jetsync.toml" run 2>"$dir/run.log" &
    pids+=($!)
done

echo "three services write $writes changes each ..."
services=()
for i in 1 2 3; do
    python3 "$here/service.py" "$work/svc-$i/svc-$i.db" --ops "$writes" --rate 500 --seed "$i" \
        --progress-every "$writes" >"$work/svc-$i/service.out" &
    services+=($!)
done
for pid in "${services[@]}"; do wait "$pid"; done
tail -qn1 "$work"/svc-*/service.out

echo "waiting for the outboxes to drain and the three files to agree ..."
python3 - "$work" <<'PY'
import sqlite3, sys, time
work = sys.argv[1]
def state(i):
    c = sqlite3.connect(f"{work}/svc-{i}/svc-{i}.db", timeout=30)
    rows = c.execute("SELECT id, n, s, f FROM items ORDER BY id").fetchall()
    left = c.execute("SELECT count(*) FROM jetsync_outbox").fetchone()[0]
    return rows, left
deadline = time.time() + 120
while True:
    states = [state(i) for i in (1, 2, 3)]
    if all(left == 0 for _, left in states) and states[0][0] == states[1][0] == states[2][0]:
        print(f"identical: {len(states[0][0])} rows on every instance, no outbox row left")
        break
    if time.time() > deadline:
        sys.exit("the instances did not converge within 120 s")
    time.sleep(0.2)
PY
for i in 1 2 3; do "$applier" --config "$work/svc-$i/jetsync.toml" digest; done
