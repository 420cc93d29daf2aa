#!/usr/bin/env bash
# The tail of durable publishes against the disk's own fdatasync tail, in one run.
#
# Issue 15 asks for p99.9 <= 1 ms and max <= 3 ms at 16 publishers. A publish
# waits for at least one fdatasync of the WAL (and, arriving mid-fsync, for the
# one in progress first), so its tail is bounded below by the disk's. This
# alternates fio's 4 KiB write + fdatasync loop (as ../shared/peers/fsync_limit.sh,
# 5 s) with `ctrlbus bench publish`, and prints each pair and their ratios.
#
# usage: benches/fsync_tail.sh [CTRLBUS_BINARY] [ROUNDS] [PUBLISHERS] [EVENTS]
#   defaults: target/release/ctrlbus, 3, 16, 100000. Run from the project root,
#   on the disk the log lives on (the files go in a temp dir under the cwd).
set -euo pipefail
bin=${1:-target/release/ctrlbus} rounds=${2:-3} P=${3:-16} N=${4:-100000}
[ -x "$bin" ] || { echo "fsync_tail.sh: no ctrlbus binary at $bin (cargo build --release --features cli first)" >&2; exit 2; }
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
work=$(mktemp -d -p .); trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
  f=$(fio --name=fsync --directory="$work" --size=32m --bs=4k --rw=write --ioengine=sync \
    --fdatasync=1 --runtime=5 --time_based --output-format=json 2>/dev/null)
  rm -f "$work"/fsync.* "$work"/bench.redb*
  c=$("$bin" bench publish --db "$work/bench.redb" --events "$N" --publishers "$P" 2>/dev/null | tail -n 1)
  python3 - "$f" "$c" "$r" <<'PY'
import json, sys
f, c, r = json.loads(sys.argv[1])["jobs"][0], json.loads(sys.argv[2]), sys.argv[3]
s = f["sync"]["lat_ns"]
fp999, fmax = s["percentile"]["99.900000"] / 1e3, s["max"] / 1e3
print(f"round {r}: fdatasync p99.9 {fp999:.0f} us, max {fmax:.0f} us ({f['write']['iops']:.0f}/s); "
      f"publish p99.9 {c['p999_us']} us, max {c['max_us']} us ({c['events_per_sec']:.0f} events/s); "
      f"publish/fdatasync p99.9 {c['p999_us'] / fp999:.2f}, max {c['max_us'] / fmax:.2f}")
PY
done
