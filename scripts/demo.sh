#!/usr/bin/env bash
# The whole pipeline against the bundled sandbox: 10,000 generated IDs, no Stripe account needed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-output
rm -rf "$OUT" && mkdir -p "$OUT"

# 10,000 accounts, plus some duplicates and a few invalid or hostile values; 40 of the
# accounts do not exist on the sandbox (they end as not_found).
$BIN/python - "$OUT" <<'PY'
import random, sys
out = sys.argv[1]
rng = random.Random(2026)
ids = [f"fca_demo{n:06d}{rng.randrange(16**6):06x}" for n in range(10_000)]
lines = ids + rng.sample(ids, 150) + ["fca_../../v1/customers", "not-an-id", "fca_1?x=1"]
rng.shuffle(lines)
open(f"{out}/accounts.txt", "w").write("\n".join(lines) + "\n")
open(f"{out}/missing.txt", "w").write("\n".join(rng.sample(ids, 40)) + "\n")
PY

# Print the first URL a background process logged, once it has.
url_from() {
    for _ in $(seq 100); do
        if grep -qE 'http://[0-9.:]+' "$1"; then
            grep -oE 'http://[0-9.:]+[^ ]*' "$1" | head -1
            return 0
        fi
        sleep 0.1
    done
    echo "did not start:" >&2
    cat "$1" >&2
    return 1
}

# Latency, a few 500s, lock timeouts and dropped connections: the retries show in the summary.
$BIN/bulkdisconnect sandbox --port 0 --latency-ms 40 --jitter-ms 30 --p500 0.01 \
    --p-lock-timeout 0.01 --p-drop 0.002 --p500-saved 0.005 --seed 7 \
    --missing "$OUT/missing.txt" > "$OUT/sandbox.log" 2>&1 &
SANDBOX=$!
trap 'kill $SANDBOX 2>/dev/null || true' EXIT
URL=$(url_from "$OUT/sandbox.log")
echo "sandbox at $URL"

# The run, then the proof of purge from Stripe's events (`--reconcile`): a batch job behind a
# firewall needs no webhook server for it.
set +e
STRIPE_API_KEY=sk_test_demo0000000000000000 $BIN/bulkdisconnect run jobs/demo.toml \
    --api-base "$URL" --metrics-file "$OUT/bulkdisconnect.prom" --reconcile
CODE=$?
set -e
echo "exit code $CODE (1 = finished, some accounts invalid or failed: see the report)"
$BIN/bulkdisconnect report --job demo --state "$OUT/state.sqlite" --format csv \
    --output "$OUT/report.csv"
$BIN/bulkdisconnect report --job demo --state "$OUT/state.sqlite" --format html \
    --output "$OUT/report.html"
$BIN/bulkdisconnect status --job demo --state "$OUT/state.sqlite"
echo "audit report: $OUT/report.html   per account: $OUT/report.csv   metrics: $OUT/bulkdisconnect.prom"
