-- Every statement both stores run, once. Loaded by store/core.py into a dict by name.
--
-- Parameters are written :name. A dialect fills the {tokens} in once, at load:
--   {now}      the database's clock, in epoch seconds (leases use it, never a worker's)
--   {real}     a double-precision column type     {bool}  a boolean column type
--   {order}    the column that keeps input order  {order_key}  its definition in `accounts`
--   {accounts_options}  storage options of `accounts`    {tables}  a query of the table names
-- What differs too much to share (claims, recording, staging, locking primitives) stays in
-- sqlite.py and postgres.py.

-- name: schema
-- The tables, created on first use; each statement is idempotent.
CREATE TABLE IF NOT EXISTS accounts (
    {order_key}
    job TEXT NOT NULL,
    -- The connected account (Stripe-Account) the row belongs to. '' is the job's own: the
    -- run's --stripe-account, or the platform (every row of a job planned before layout 4).
    stripe_account TEXT NOT NULL DEFAULT '',
    account_id TEXT NOT NULL,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    request_id TEXT,
    first_attempt_at {real},
    updated_at {real},
    run_id TEXT,  -- the run that claimed or recorded it
    claim_gen INTEGER NOT NULL DEFAULT 0,  -- each claim increments it: a write names its claim
    confirmed_at {real},
    event_id TEXT,
    -- What Stripe reported when `verify` read the account back (GET .../accounts/{id}):
    -- active, inactive or disconnected (not_found: gone), when, and in which verify pass.
    verified_at {real},
    verified_status TEXT,
    verified_pass TEXT,
    UNIQUE (job, stripe_account, account_id)
){accounts_options};
CREATE TABLE IF NOT EXISTS customers (
    job TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    listed_at {real} NOT NULL,
    PRIMARY KEY (job, customer_id)
);
-- Replay protection per job: Stripe sends one event to every endpoint, and jobs share stores.
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL,
    event_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    received_at {real} NOT NULL,
    PRIMARY KEY (job, event_id)
);
-- Deliveries of events for accounts outside the job: counted, their accounts not kept.
CREATE TABLE IF NOT EXISTS unknown_events (
    job TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    last_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    job TEXT NOT NULL,
    owner TEXT NOT NULL,  -- the holder's run ID
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at {real} NOT NULL,
    heartbeat_at {real} NOT NULL,  -- the database's clock
    lease {real} NOT NULL,  -- seconds without a heartbeat after which the hold is lost
    shared {bool} NOT NULL,  -- a `run --join` worker
    share_of INTEGER NOT NULL,  -- the holder runs at (at most) --rate / share_of
    planned {bool} NOT NULL DEFAULT FALSE,  -- it planned, or found planned, the input
    source TEXT NOT NULL DEFAULT '',  -- its source arguments, fingerprinted
    PRIMARY KEY (job, owner)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    started_at {real} NOT NULL,
    finished_at {real},
    exit_code INTEGER,
    summary TEXT
);
-- How far `reconcile` has read Stripe's events, per connected account of the job ('' its own).
CREATE TABLE IF NOT EXISTS reconciled (
    job TEXT NOT NULL,
    stripe_account TEXT NOT NULL,
    -- Every event created before this (unix seconds, Stripe's clock) was listed, late ones
    -- included: the next pass reads only from here on. NULL: no pass finished yet.
    created_upto BIGINT,
    -- A pass cut short: the last event it listed (it goes on after it, toward older ones), the
    -- oldest `created` it reads down to, and the newest `created` it saw. NULL when none.
    last_event_id TEXT,
    pass_floor BIGINT,
    pass_top BIGINT,
    events BIGINT NOT NULL DEFAULT 0,  -- events listed, every pass together
    pages BIGINT NOT NULL DEFAULT 0,  -- list calls answered
    at {real} NOT NULL,  -- last progress
    PRIMARY KEY (job, stripe_account)
);
-- `verify` passes: each reads a selection of the job's accounts back from Stripe once; an
-- interrupted pass is resumed by the next `verify` of the same selection.
CREATE TABLE IF NOT EXISTS verify_passes (
    job TEXT NOT NULL,
    pass_id TEXT NOT NULL,
    selection TEXT NOT NULL,  -- unconfirmed, all, or sample:N
    started_at {real} NOT NULL,
    finished_at {real},
    PRIMARY KEY (job, pass_id)
);
-- A run's cumulative counters over time, for the HTML report's charts.
CREATE TABLE IF NOT EXISTS samples (
    job TEXT NOT NULL,
    run_id TEXT NOT NULL,
    at {real} NOT NULL,  -- epoch seconds
    requests BIGINT NOT NULL,
    rate_limited BIGINT NOT NULL,
    disconnected BIGINT NOT NULL,
    target_rate {real} NOT NULL,
    PRIMARY KEY (run_id, at)
);
CREATE INDEX IF NOT EXISTS samples_job ON samples (job, at);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- name: tables
-- The names of the store's tables.
{tables};

-- name: schema_version
-- The layout this store was last migrated to (none: created before versions were kept).
SELECT value FROM meta WHERE key = 'schema_version';

-- name: set_schema_version
-- Record the layout the store now has.
INSERT INTO meta (key, value) VALUES ('schema_version', :version)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: holders
-- Every holder of the job's lock, live or stale, oldest first, with the database's clock.
SELECT owner, pid, host, heartbeat_at, lease, shared, source, {now} AS now
FROM locks WHERE job = :job ORDER BY acquired_at, owner;

-- name: drop_stale_holders
-- Forget the holders whose lease ran out: they hold nothing any more.
DELETE FROM locks WHERE job = :job AND {now} - heartbeat_at >= lease;

-- name: add_holder
-- Hold the job (alone, or as one of its `run --join` workers).
INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, shared, share_of,
                   source)
VALUES (:job, :owner, :pid, :host, {now}, {now}, :lease, :shared, :share_of, :source)
ON CONFLICT (job, owner) DO NOTHING;

-- name: renew_lease
-- A heartbeat: renew a hold that has not run out (a lapsed one stays lost).
UPDATE locks SET heartbeat_at = {now}
WHERE job = :job AND owner = :owner AND {now} - heartbeat_at < lease;

-- name: holds_lease
-- Whether this owner still holds the job: its lease has not run out, nobody took over.
SELECT 1 FROM locks WHERE job = :job AND owner = :owner AND {now} - heartbeat_at < lease;

-- name: live_shares
-- The live holders of the job and the share of --rate each runs at.
SELECT owner, share_of FROM locks WHERE job = :job AND {now} - heartbeat_at < lease;

-- name: set_share
-- The holder now runs at --rate / :workers.
UPDATE locks SET share_of = :workers WHERE job = :job AND owner = :owner;

-- name: drop_holder
-- Give up this owner's hold on the job.
DELETE FROM locks WHERE job = :job AND owner = :owner;

-- name: planned_by_a_live_holder
-- Whether a live holder of the job planned (or found planned) its input.
SELECT EXISTS (
    SELECT 1 FROM locks WHERE job = :job AND planned AND {now} - heartbeat_at < lease
);

-- name: mark_planned
-- This holder planned, or found planned, the input.
UPDATE locks SET planned = TRUE WHERE job = :job AND owner = :owner;

-- name: count_staged
-- What merging the staged input would find: unique, invalid, already done, new to call,
-- unseen by the job, settled by the source; and what the merge decides without a call: new
-- invalid values, settled accounts not yet final. Changes nothing. (valid: 1 yes; 0 a bad
-- account ID; -1 a bad connected account.)
SELECT COUNT(*),
    COALESCE(SUM(CASE WHEN s.valid <> 1 THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN s.valid = 1 AND a.outcome IS NOT NULL
                      AND NOT (:retry_failed = 1 AND a.outcome = 'failed') THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN s.valid = 1 AND s.settled IS NULL AND a.account_id IS NULL
                      THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN a.account_id IS NULL THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN s.settled IS NOT NULL THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN s.valid <> 1 AND a.account_id IS NULL THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN s.valid = 1 AND s.settled IS NOT NULL
                      AND (a.account_id IS NULL OR a.outcome IS NULL
                           OR (:retry_failed = 1 AND a.outcome = 'failed'))
                      THEN 1 ELSE 0 END), 0)
FROM staged s LEFT JOIN accounts a
    ON a.job = :job AND a.stripe_account = s.stripe_account AND a.account_id = s.account_id;

-- name: count_still_pending
-- Accounts of the job left to call after the merge, other than those the input settles.
SELECT COUNT(*) FROM accounts a
WHERE a.job = :job AND (a.outcome IS NULL OR (:retry_failed = 1 AND a.outcome = 'failed'))
  AND NOT EXISTS (SELECT 1 FROM staged s WHERE s.account_id = a.account_id
                  AND s.stripe_account = a.stripe_account
                  AND s.valid = 1 AND s.settled IS NOT NULL);

-- name: reopen_failed
-- --retry-failed: the job's failed accounts are to call again.
UPDATE accounts SET outcome = NULL WHERE job = :job AND outcome = 'failed';

-- name: merge_staged
-- Add the staged values the job lacks, in input order: invalid ones recorded invalid_id,
-- settled ones (a Stripe list showed them disconnected) with their outcome, the rest to call.
-- A span of positions at a time (after, up to].
INSERT INTO accounts (job, stripe_account, account_id, outcome, error_code, error_message,
                      updated_at)
SELECT :job, s.stripe_account, s.account_id,
    CASE WHEN s.valid <> 1 THEN 'invalid_id' ELSE s.settled END,
    CASE WHEN s.valid <> 1 THEN 'invalid_id' END,
    CASE WHEN s.valid = 0 THEN :invalid_message
         WHEN s.valid = -1 THEN :invalid_account_message
         WHEN s.settled IS NOT NULL THEN :settled_message END,
    CASE WHEN s.valid <> 1 OR s.settled IS NOT NULL THEN CAST(:now AS DOUBLE PRECISION) END
FROM staged s WHERE s.pos > :after AND s.pos <= :upto ORDER BY s.pos
ON CONFLICT (job, stripe_account, account_id) DO NOTHING;

-- name: settle_pending
-- An account already pending in the job that the input settles needs no call.
UPDATE accounts SET outcome = s.settled, error_message = :settled_message, updated_at = :now
FROM staged s
WHERE accounts.job = :job AND accounts.account_id = s.account_id
  AND accounts.stripe_account = s.stripe_account AND accounts.outcome IS NULL AND s.settled IS NOT NULL AND s.valid = 1;

-- name: listed_before
-- Whether an earlier plan of the job listed this customer's accounts.
SELECT 1 FROM customers WHERE job = :job AND customer_id = :customer;

-- name: remember_listed
-- Remember that a customer's accounts are in the job, so a rerun does not list them.
INSERT INTO customers (job, customer_id, listed_at) VALUES (:job, :customer, :now)
ON CONFLICT DO NOTHING;

-- name: pending_elsewhere
-- Whether accounts still to call are held by another run (or free to claim).
SELECT EXISTS (
    SELECT 1 FROM accounts
    WHERE job = :job AND outcome IS NULL AND (run_id IS NULL OR run_id <> :run_id)
);

-- name: release_refused
-- A tripped breaker: this run's failed and not_found answers are not final after all.
UPDATE accounts SET outcome = NULL
WHERE job = :job AND run_id = :run_id AND outcome IN ('failed', 'not_found');

-- name: release_refused_lane
-- A breaker tripped on one connected account's answers: those are not final after all.
UPDATE accounts SET outcome = NULL
WHERE job = :job AND run_id = :run_id AND stripe_account = :stripe_account
  AND outcome IN ('failed', 'not_found');

-- name: fail_lane
-- The platform has no access to a connected account (403 account_invalid): the accounts of
-- the job still to call under it end failed with Stripe's answer, without a call each;
-- those a live run holds (maybe in flight, or answered and not yet written) it records.
UPDATE accounts SET outcome = 'failed', http_status = :http_status, error_code = :error_code,
    error_message = :error_message, request_id = :request_id, updated_at = :now
WHERE job = :job AND stripe_account = :stripe_account AND outcome IS NULL
  AND (run_id IS NULL OR run_id NOT IN (
      SELECT owner FROM locks WHERE job = :job AND {now} - heartbeat_at < lease));

-- name: lanes
-- The connected accounts of the job ('' included), each found through the unique index.
WITH RECURSIVE lane (stripe_account) AS (
    SELECT min(stripe_account) FROM accounts WHERE job = :job
    UNION ALL
    SELECT (SELECT min(stripe_account) FROM accounts
            WHERE job = :job AND stripe_account > lane.stripe_account)
    FROM lane WHERE lane.stripe_account IS NOT NULL
)
SELECT stripe_account FROM lane WHERE stripe_account IS NOT NULL;

-- name: lane_counts
-- Accounts of the job per connected account and outcome (NULL: still to call).
SELECT stripe_account, outcome, COUNT(*) FROM accounts WHERE job = :job
GROUP BY stripe_account, outcome;

-- name: outcome_counts
-- Accounts of the job per outcome (NULL: still to call).
SELECT outcome, COUNT(*) FROM accounts WHERE job = :job GROUP BY outcome;

-- name: confirmed_count
-- Accounts whose disconnection a webhook event confirmed.
SELECT COUNT(*) FROM accounts WHERE job = :job AND confirmed_at IS NOT NULL;

-- name: unknown_events
-- Events received for accounts outside the job.
SELECT count FROM unknown_events WHERE job = :job;

-- name: has_job
-- Whether the store holds anything of the job: a run or an account.
SELECT EXISTS (SELECT 1 FROM runs WHERE job = :job)
    OR EXISTS (SELECT 1 FROM accounts WHERE job = :job);

-- name: report_page
-- The next page of the job's accounts in input order (or only disconnected, unconfirmed).
SELECT {order}, stripe_account, account_id, outcome, attempts, http_status, error_code, error_message,
    request_id, first_attempt_at, updated_at, confirmed_at, event_id, verified_at, verified_status
FROM accounts
WHERE job = :job AND {order} > :after
  AND (:unconfirmed = 0 OR (outcome = 'disconnected' AND confirmed_at IS NULL))
ORDER BY {order} LIMIT :limit;

-- name: report_page_v4
-- report_page of a layout-4 store, read without migrating it: nothing was read back yet.
SELECT {order}, stripe_account, account_id, outcome, attempts, http_status, error_code, error_message,
    request_id, first_attempt_at, updated_at, confirmed_at, event_id, NULL, NULL
FROM accounts
WHERE job = :job AND {order} > :after
  AND (:unconfirmed = 0 OR (outcome = 'disconnected' AND confirmed_at IS NULL))
ORDER BY {order} LIMIT :limit;

-- name: claim_event
-- Take an event ID first: a second delivery of it (even concurrent) is then a replay.
INSERT INTO events (event_id, job, account_id, received_at)
VALUES (:event_id, :job, :account_id, :at)
ON CONFLICT DO NOTHING;

-- name: confirm_account
-- Record the event on the account's outcome.
UPDATE accounts SET confirmed_at = :at, event_id = :event_id
WHERE job = :job AND account_id = :account_id;

-- name: forget_event
-- The event's account is not in the job: keep nothing of it.
DELETE FROM events WHERE job = :job AND event_id = :event_id;

-- name: count_unknown_event
-- Count a delivery for an account outside the job.
INSERT INTO unknown_events (job, count, last_at) VALUES (:job, 1, :at)
ON CONFLICT (job) DO UPDATE SET count = unknown_events.count + 1, last_at = excluded.last_at;

-- name: forget_accounts
-- `forget`: the job's accounts and their outcomes.
DELETE FROM accounts WHERE job = :job;

-- name: forget_customers
DELETE FROM customers WHERE job = :job;

-- name: forget_events
DELETE FROM events WHERE job = :job;

-- name: forget_unknown_events
DELETE FROM unknown_events WHERE job = :job;

-- name: forget_runs
DELETE FROM runs WHERE job = :job;

-- name: forget_holders
DELETE FROM locks WHERE job = :job;

-- name: forget_reconciled
DELETE FROM reconciled WHERE job = :job;

-- name: forget_verify_passes
DELETE FROM verify_passes WHERE job = :job;

-- name: forget_samples
DELETE FROM samples WHERE job = :job;

-- name: jobs_finished_before
-- Jobs whose last run finished (exit 0 or 1: nothing left to resume) before :before.
SELECT r.job FROM runs r
WHERE r.started_at = (SELECT max(started_at) FROM runs WHERE job = r.job)
  AND r.finished_at IS NOT NULL AND r.finished_at < :before AND r.exit_code IN (0, 1)
ORDER BY r.job;

-- name: remember_source
-- What the job's last run read its accounts from (a description, passwords masked).
INSERT INTO meta (key, value) VALUES ('source:' || :job, :source)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: job_source
SELECT value FROM meta WHERE key = 'source:' || :job;

-- name: forget_source
DELETE FROM meta WHERE key = 'source:' || :job;

-- name: start_run
-- A run of the job started.
INSERT INTO runs (run_id, job, started_at) VALUES (:run_id, :job, :now)
ON CONFLICT DO NOTHING;

-- name: finish_run
-- How a run ended.
UPDATE runs SET finished_at = :now, exit_code = :exit_code, summary = :summary
WHERE run_id = :run_id;

-- name: last_run
-- The job's most recent run.
SELECT run_id, started_at, finished_at, exit_code, summary FROM runs
WHERE job = :job ORDER BY started_at DESC LIMIT 1;

-- name: job_runs
-- The job's runs, oldest first (the HTML report's "by which runs"), at most :limit.
SELECT run_id, started_at, finished_at, exit_code, summary FROM runs
WHERE job = :job ORDER BY started_at, run_id LIMIT :limit;

-- name: run_count
-- How many runs the job had.
SELECT COUNT(*) FROM runs WHERE job = :job;

-- name: disconnected_span
-- When the job's first and last disconnect were recorded (NULL, NULL: none yet).
SELECT min(updated_at), max(updated_at) FROM accounts
WHERE job = :job AND outcome = 'disconnected' AND updated_at IS NOT NULL;

-- name: disconnected_buckets
-- Disconnects recorded per time bucket of :width_ms milliseconds from :start_ms (bucket 0),
-- for the HTML report's chart: one row per bucket, never one per account. Integer division
-- of whole milliseconds floors alike in both databases (a cast of a double does not).
SELECT (CAST(updated_at * 1000 AS BIGINT) - :start_ms) / :width_ms AS bucket, COUNT(*)
FROM accounts
WHERE job = :job AND outcome = 'disconnected' AND updated_at IS NOT NULL
GROUP BY 1 ORDER BY 1;

-- name: problem_rows
-- The job's first :limit failed and invalid_id accounts in input order, with Stripe's answer.
SELECT stripe_account, account_id, outcome, attempts, http_status, error_code, error_message,
    request_id, first_attempt_at, updated_at, confirmed_at, event_id
FROM accounts
WHERE job = :job AND outcome IN ('failed', 'invalid_id')
ORDER BY {order} LIMIT :limit;

-- name: problem_codes
-- The job's failed and invalid_id accounts per (outcome, HTTP status, error code), most first.
SELECT outcome, http_status, error_code, COUNT(*) AS n FROM accounts
WHERE job = :job AND outcome IN ('failed', 'invalid_id')
GROUP BY outcome, http_status, error_code
ORDER BY n DESC, outcome, error_code LIMIT :limit;

-- name: record_sample
-- A run's cumulative counters at one moment (written again after a lost reply: kept once).
INSERT INTO samples (job, run_id, at, requests, rate_limited, disconnected, target_rate)
VALUES (:job, :run_id, :at, :requests, :rate_limited, :disconnected, :target_rate)
ON CONFLICT (run_id, at) DO NOTHING;

-- name: samples
-- Every run's samples of the job, oldest first.
SELECT run_id, at, requests, rate_limited, disconnected, target_rate FROM samples
WHERE job = :job ORDER BY at, run_id;

-- name: confirm_account_lane
-- Record an event listed under one connected account on that account's row of the job.
UPDATE accounts SET confirmed_at = :at, event_id = :event_id
WHERE job = :job AND stripe_account = :stripe_account AND account_id = :account_id;

-- name: reconcile_span
-- One connected account's accounts of the job that a call was made for: the first attempt
-- among them, and how many are recorded disconnected with no event confirming it yet.
SELECT min(first_attempt_at),
    COALESCE(SUM(CASE WHEN outcome = 'disconnected' AND confirmed_at IS NULL THEN 1 ELSE 0 END), 0)
FROM accounts
WHERE job = :job AND stripe_account = :stripe_account AND first_attempt_at IS NOT NULL;

-- name: reconcile_progress
-- How far reconcile read one connected account's events.
SELECT created_upto, last_event_id, pass_floor, pass_top, events, pages, at FROM reconciled
WHERE job = :job AND stripe_account = :stripe_account;

-- name: reconcile_progress_all
-- How far reconcile read each connected account's events, least far first.
SELECT stripe_account, created_upto, last_event_id, pass_floor, pass_top, events, pages, at
FROM reconciled WHERE job = :job ORDER BY created_upto, stripe_account;

-- name: save_reconciled
-- A page of events read: where the pass goes on (or NULL: it ended), and how far every event
-- is read (it never moves back).
INSERT INTO reconciled (job, stripe_account, created_upto, last_event_id, pass_floor, pass_top,
                        events, pages, at)
VALUES (:job, :stripe_account, :created_upto, :last_event_id, :pass_floor, :pass_top, :events,
        1, :at)
ON CONFLICT (job, stripe_account) DO UPDATE SET
    created_upto = CASE
        WHEN reconciled.created_upto IS NULL OR excluded.created_upto > reconciled.created_upto
        THEN excluded.created_upto ELSE reconciled.created_upto END,
    last_event_id = excluded.last_event_id, pass_floor = excluded.pass_floor,
    pass_top = excluded.pass_top, events = reconciled.events + excluded.events,
    pages = reconciled.pages + 1, at = excluded.at;

-- name: open_verify_pass
-- The job's latest verify pass that did not finish.
SELECT pass_id, selection, started_at FROM verify_passes
WHERE job = :job AND finished_at IS NULL ORDER BY started_at DESC, pass_id DESC LIMIT 1;

-- name: last_verify_pass
-- The job's latest verify pass, finished or not.
SELECT pass_id, selection, started_at, finished_at FROM verify_passes
WHERE job = :job ORDER BY started_at DESC, pass_id DESC LIMIT 1;

-- name: start_verify_pass
-- A new verify pass of the job.
INSERT INTO verify_passes (job, pass_id, selection, started_at)
VALUES (:job, :pass_id, :selection, :now)
ON CONFLICT (job, pass_id) DO NOTHING;

-- name: close_verify_passes
-- The job's passes other than :pass_id that did not finish are not resumed any more.
UPDATE verify_passes SET finished_at = :now
WHERE job = :job AND finished_at IS NULL AND pass_id <> :pass_id;

-- name: finish_verify_pass
-- A verify pass read back every account it chose.
UPDATE verify_passes SET finished_at = :now WHERE job = :job AND pass_id = :pass_id;

-- name: verify_candidates
-- The next page, in input order, of the job's accounts recorded disconnected (only those no
-- event confirmed, with :unconfirmed = 1) that pass :pass_id has not read back ('' : any).
SELECT {order}, stripe_account, account_id, verified_pass FROM accounts
WHERE job = :job AND {order} > :after AND outcome = 'disconnected'
  AND (:unconfirmed = 0 OR confirmed_at IS NULL)
  AND (:pass_id = '' OR verified_pass IS NULL OR verified_pass <> :pass_id)
ORDER BY {order} LIMIT :limit;

-- name: record_verified
-- What Stripe reported for one account read back, by a holder of the job's lease.
UPDATE accounts SET verified_at = :at, verified_status = :status, verified_pass = :pass_id
WHERE job = :job AND stripe_account = :stripe_account AND account_id = :account_id
  AND EXISTS (SELECT 1 FROM locks
              WHERE job = :job AND owner = :owner AND {now} - heartbeat_at < lease);

-- name: verify_counts
-- The job's accounts read back and not active (disconnected, inactive or gone), those
-- recorded disconnected that Stripe reports active again, and those recorded disconnected
-- never read back.
SELECT
    COALESCE(SUM(CASE WHEN verified_status IN ('disconnected', 'inactive', 'not_found')
                      THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN outcome = 'disconnected' AND verified_status = 'active'
                      THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN outcome = 'disconnected' AND verified_at IS NULL THEN 1 ELSE 0 END), 0)
FROM accounts WHERE job = :job;

-- name: pass_counts
-- What one verify pass read back, per status.
SELECT verified_status, COUNT(*) FROM accounts
WHERE job = :job AND verified_pass = :pass_id GROUP BY verified_status;
