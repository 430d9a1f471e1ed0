-- Budget checks in constant time. A hold used to sum the tenant's whole ledger in the budget's
-- window (`SUM(...) FROM ledger_events`) for every budget that applies, so every governed call
-- got slower as the ledger grew. Now each budget keeps a running total per window, added to in
-- the same transaction as the usage entry that counts against it (the ledger is append-only, so
-- totals only ever grow), and a check reads one row per budget.
--
-- The budget's subject and window move out of `budget_json` into columns so the per-entry
-- update is one INSERT ... SELECT over the tenant's budgets (no JSON decoding per call).
ALTER TABLE budgets ADD COLUMN principal TEXT;
ALTER TABLE budgets ADD COLUMN session TEXT;
ALTER TABLE budgets ADD COLUMN window_kind TEXT NOT NULL DEFAULT 'total';
UPDATE budgets SET
    principal = json_extract(budget_json, '$.principal'),
    session = json_extract(budget_json, '$.session'),
    window_kind = json_extract(budget_json, '$.window');

-- What counts against a budget in one window: the usage entries (`model_usage`, `tool_usage`,
-- `overage`) of its subject whose time falls in the window starting at `window_start`
-- (microseconds: the UTC day or month start; 0 for a total budget). Per-request budgets have no
-- rows: they limit each request alone.
CREATE TABLE budget_totals (
    budget_id    TEXT NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    window_start INTEGER NOT NULL,
    tokens       INTEGER NOT NULL,
    cost_nanos   INTEGER NOT NULL,
    requests     INTEGER NOT NULL,
    tool_calls   INTEGER NOT NULL,
    PRIMARY KEY (budget_id, window_start)
) WITHOUT ROWID;

-- The usage already in the ledger (the same bucketing as the store's per-entry update).
INSERT INTO budget_totals (budget_id, window_start, tokens, cost_nanos, requests, tool_calls)
SELECT b.id,
       CASE b.window_kind
           WHEN 'daily' THEN (l.at / 86400000000) * 86400000000
           WHEN 'monthly' THEN unixepoch(strftime('%Y-%m-01', l.at / 1000000, 'unixepoch')) * 1000000
           ELSE 0
       END AS window_start,
       SUM(l.tokens), SUM(l.cost_nanos), SUM(l.requests), SUM(l.tool_calls)
FROM budgets b
JOIN ledger_events l ON l.tenant = b.tenant
WHERE b.window_kind <> 'per_request'
  AND l.kind IN ('model_usage', 'tool_usage', 'overage')
  AND (b.principal IS NULL OR l.principal = b.principal)
  AND (b.session IS NULL OR l.session = b.session)
GROUP BY b.id, window_start;
