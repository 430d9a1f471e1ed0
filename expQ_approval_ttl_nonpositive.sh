#!/bin/bash
# Q: `[agent] approval_ttl_secs = 0` (or negative) is accepted; every call that needs an approval then
# loops forever ("an action needs a positive ttl"), appending a progress event per retry; the caller
# prints nothing and never returns.
source /work/redteam29/chaos/lib.sh
newhome "[agent]
poll_ms = 100
approval_ttl_secs = ${TTL:-0}"
printf 'version = 1\ndefault = "allow"\n[[tool]]\nname = "ask"\ntools = ["fs/write"]\ndecision = "require_approval"\n' > $KEEL_HOME/policy.toml
timeout 6 $K call fs/write '{"path":"/out/a","content":"x"}' > $D/call.out 2>&1; echo "keel call rc=$? (124 = killed by timeout after 6 s); its output: '$(head -c 200 $D/call.out)'"
timeout 6 $K worker > $D/worker.log 2>&1
echo "job: $(sq 'select state from jobs'); actions: $(sq 'select count(*) from actions'); progress events after 6 s of worker: $(sq "select count(*) from events where event_type='progress'")"
sq "select data_json from events where event_type='progress' limit 1"
