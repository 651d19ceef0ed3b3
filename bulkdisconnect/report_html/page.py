"""The HTML of the report: one page, everything inline, every stored value escaped.

Account IDs (an invalid one is whatever the input held), connected accounts and Stripe's
messages are hostile input: each goes through `_text`, which escapes it for HTML and makes
control characters visible. The page carries no script, and its Content-Security-Policy
forbids every fetch and script, so even a value that got through could load nothing.
"""

from __future__ import annotations

import html
import re
import shlex
import time
from importlib import resources

from bulkdisconnect.errors import ExitCode
from bulkdisconnect.model import Outcome
from bulkdisconnect.report_html import charts
from bulkdisconnect.report_html.facts import Audit
from bulkdisconnect.store import LaneCounts, ReportRow, RunInfo

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# Connected accounts listed one a row; the rest are added up in one.
LANE_ROWS = 100
# Longer messages are cut in the page (the CSV has them whole).
MESSAGE_CHARS = 500
OUTCOME_MEANINGS = {
    "disconnected": "the API returned the account disconnected",
    "not_found": "404 resource_missing: nothing to disconnect",
    "invalid_id": "not an account ID; never sent to the API",
    "failed": "a non-retryable error, or retries exhausted",
    None: "pending: still to call",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def render(audit: Audit, *, version: str, charts_on: bool = True) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Purge report: {_text(audit.job)}</title>",
        f"<style>\n{_style()}</style></head><body>",
        f'<h1>Purge report: job <code id="job">{_text(audit.job)}</code></h1>',
        (
            f'<p class="meta">Generated {_when(audit.generated_at)} by bulkdisconnect '
            f"{_text(version)} from the store <code>{_text(audit.store)}</code>.</p>"
        ),
        (
            f'<p class="meta">Accounts read from <code id="source">{_text(audit.source)}</code>'
            " (the job's last run).</p>"
            if audit.source
            else ""
        ),
        _verdict(audit),
        *_totals(audit),
        *_proof(audit),
        *_runs(audit),
        *_activity(audit, charts_on=charts_on),
        *_lanes(audit, charts_on=charts_on),
        *_problems(audit),
        *_full_report(audit),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _verdict(audit: Audit) -> str:
    counts, total = audit.counts, audit.total
    pending = counts.get(None, 0)
    live = [lock for lock in audit.holders if lock.live]
    reactivated = audit.verified.reactivated
    if live:
        kind, says = (
            "warn",
            (
                f"In progress: a run holds the job now, {_n(pending)} accounts are still to call. "
                "These figures are a snapshot."
            ),
        )
    elif pending:
        kind, says = (
            "warn",
            (
                f"Not finished: {_n(pending)} of {_n(total)} accounts are still to call. "
                "Run the job again to finish it."
            ),
        )
    elif audit.problem_total:
        kind, says = (
            "bad",
            (
                f"Finished, {_n(audit.problem_total)} of {_n(total)} accounts not disconnected: "
                f"{_n(counts.get('failed', 0))} failed, {_n(counts.get('invalid_id', 0))} invalid "
                "(listed below)."
            ),
        )
    else:
        kind, says = (
            "ok",
            (f"Finished: each of the {_n(total)} accounts was disconnected or not found."),
        )
    if reactivated:
        kind = "bad"
        says += (
            f" {_n(reactivated)} accounts recorded disconnected were found active again when "
            "read back (verify): they are listed in the full report, verified_status active."
        )
    return f'<p id="verdict" class="verdict {kind}">{says}</p>'


def _totals(audit: Audit) -> list[str]:
    total = audit.total
    rows = []
    for outcome in [*(o.value for o in Outcome), None]:
        n = audit.counts.get(outcome, 0)
        name = outcome or "pending"
        rows.append(
            f'<tr><td>{_swatch(outcome)}{name}</td><td class="note">{OUTCOME_MEANINGS[outcome]}'
            f'</td><td class="n" id="count-{name}">{_n(n)}</td>'
            f'<td class="n">{_share(n, total)}</td></tr>'
        )
    return [
        '<section id="totals"><h2>Outcomes</h2>',
        (
            '<table><tr><th>outcome</th><th>meaning</th><th class="n">accounts</th>'
            '<th class="n">share</th></tr>'
        ),
        *rows,
        (
            f'<tr class="total"><td>total</td><td></td><td class="n" id="count-total">'
            f"{_n(total)}</td><td></td></tr></table></section>"
        ),
    ]


def _proof(audit: Audit) -> list[str]:
    disconnected = audit.counts.get(Outcome.DISCONNECTED.value, 0)
    verified = audit.verified
    rows = [
        (
            "proof-confirmed",
            "confirmed",
            "a Stripe event (webhook or reconcile) said so",
            audit.confirmed,
        ),
        (
            "proof-unconfirmed",
            "unconfirmed",
            "recorded disconnected, no Stripe event recorded for it",
            max(disconnected - audit.confirmed, 0),
        ),
        (
            "proof-unknown-events",
            "events outside the job",
            "events received for accounts that are not in the job",
            audit.unknown_events,
        ),
        (
            "verify-verified",
            "verified",
            "read back from Stripe: disconnected, inactive or gone",
            verified.verified,
        ),
        (
            "verify-reactivated",
            "reactivated",
            "recorded disconnected, read back ACTIVE again",
            verified.reactivated,
        ),
        (
            "verify-unverified",
            "never read back",
            "recorded disconnected, not read back",
            verified.unverified,
        ),
    ]
    lines = [
        '<section id="proof"><h2>Proof of disconnection</h2><table>',
        *(
            f'<tr><td>{label}</td><td class="note">{meaning}</td>'
            f'<td class="n" id="{key}">{_n(n)}</td></tr>'
            for key, label, meaning, n in rows
        ),
        "</table>",
    ]
    lines.append(f'<p class="note">{_reconciled(audit)}</p>')
    return [*lines, "</section>"]


def _reconciled(audit: Audit) -> str:
    """How far `reconcile` read Stripe's events, in a sentence."""
    if not audit.reconciled:
        return (
            "Stripe's events were never reconciled: <code>bulkdisconnect reconcile</code> "
            "confirms disconnects from them, within Stripe's 30 days."
        )
    upto = [p.created_upto for p in audit.reconciled if p.created_upto is not None]
    read = sum(p.events for p in audit.reconciled)
    if len(upto) < len(audit.reconciled):
        return f"Stripe's events read in part ({_n(read)} listed): a rerun of reconcile goes on."
    return f"Stripe's events read up to {_when(min(upto))} UTC ({_n(read)} listed)."


def _runs(audit: Audit) -> list[str]:
    lines = [
        '<section id="runs"><h2>Runs</h2>',
        f'<p class="note">{_n(audit.run_total)} run(s) of this job, oldest first.</p>',
    ]
    if not audit.runs:
        return [*lines, "</section>"]
    lines.append(
        '<table><tr><th>run</th><th>started</th><th>ended</th><th class="n">took</th>'
        "<th>exit code</th><th>summary</th></tr>"
    )
    lines += [_run_row(run) for run in audit.runs]
    lines.append("</table>")
    if audit.run_total > len(audit.runs):
        lines.append(f'<p class="note">and {_n(audit.run_total - len(audit.runs))} later runs.</p>')
    return [*lines, "</section>"]


def _run_row(run: RunInfo) -> str:
    ended = _when(run.finished_at) if run.finished_at is not None else "did not finish"
    took = _took(run.finished_at - run.started_at) if run.finished_at is not None else ""
    if run.exit_code is None:
        code = ""
    else:
        try:
            code = f"{run.exit_code}: {ExitCode(run.exit_code).meaning}"
        except ValueError:
            code = str(run.exit_code)
    summary = (
        f"<details><summary>summary</summary><pre>{_text(run.summary)}</pre></details>"
        if run.summary
        else ""
    )
    return (
        f'<tr><td class="id">{_text(run.run_id)}</td><td>{_when(run.started_at)}</td>'
        f'<td>{ended}</td><td class="n">{took}</td><td>{_text(code)}</td><td>{summary}</td></tr>'
    )


def _activity(audit: Audit, *, charts_on: bool) -> list[str]:
    lines = ['<section id="activity"><h2>Activity over time</h2>']
    timeline = audit.timeline
    if timeline is None:
        return [*lines, '<p class="note">No disconnect recorded yet.</p></section>']
    if charts_on:
        lines.append(
            f'<figure role="img" aria-label="disconnects and 429 answers over time">'
            f"{charts.activity(timeline)}<figcaption>Disconnects recorded"
            f"{' and 429 answers received' if timeline.sampled else ''} per "
            f"{charts.duration(timeline.width)}, UTC.</figcaption></figure>"
        )
    if not timeline.sampled:
        lines.append(
            '<p class="note">The request rate and the 429 answers are sampled by runs of this '
            "version; no run of this job recorded samples.</p>"
        )
    elif charts_on:
        lines.append(
            '<figure role="img" aria-label="request rate against the target rate">'
            f"{charts.rates(timeline)}<figcaption>Requests per second against the rate the runs "
            "aimed at (their pacers' target, at most --rate), averaged per "
            f"{charts.duration(timeline.width)}.</figcaption></figure>"
        )
    return [*lines, "</section>"]


def _lanes(audit: Audit, *, charts_on: bool) -> list[str]:
    if len(audit.lanes) < 2:
        return []
    lines = [
        '<section id="lanes"><h2>Per connected account</h2>',
        f'<p class="note">{_n(len(audit.lanes))} Stripe accounts, most still to call first.</p>',
    ]
    if charts_on:
        lines.append(
            f'<figure role="img" aria-label="outcomes per connected account">'
            f"{charts.lanes(audit.lanes)}</figure>"
        )
    header = "".join(f'<th class="n">{o or "pending"}</th>' for o in charts.COLOURS)
    lines.append(f'<table><tr><th>Stripe account</th>{header}<th class="n">total</th></tr>')
    lines += [
        _lane_row(_text(lane.stripe_account) or "(own)", lane) for lane in audit.lanes[:LANE_ROWS]
    ]
    rest = audit.lanes[LANE_ROWS:]
    if rest:
        added: dict[str | None, int] = {}
        for lane in rest:
            for outcome, n in lane.counts.items():
                added[outcome] = added.get(outcome, 0) + n
        lines.append(_lane_row(f"{_n(len(rest))} more", LaneCounts("", added)))
    return [*lines, "</table></section>"]


def _lane_row(name: str, lane: LaneCounts) -> str:
    cells = "".join(f'<td class="n">{_n(lane.counts.get(o, 0))}</td>' for o in charts.COLOURS)
    return (
        f'<tr><td class="id">{name}</td>{cells}'
        f'<td class="n">{_n(sum(lane.counts.values()))}</td></tr>'
    )


def _problems(audit: Audit) -> list[str]:
    total = audit.problem_total
    lines = ['<section id="problems"><h2>Failed and invalid accounts</h2>']
    if not total:
        return [*lines, '<p class="note">None.</p></section>']
    lines.append(
        '<table><tr><th>outcome</th><th class="n">HTTP status</th><th>code</th>'
        '<th class="n">accounts</th></tr>'
    )
    lines += [
        f'<tr><td>{_swatch(outcome)}{_text(outcome)}</td><td class="n">{_text(status)}</td>'
        f'<td><code>{_text(code)}</code></td><td class="n">{_n(n)}</td></tr>'
        for outcome, status, code, n in audit.problem_codes
    ]
    lines.append("</table>")
    shown = len(audit.problems)
    which = f"The first {_n(shown)} of {_n(total)}" if total > shown else f"All {_n(total)}"
    more = (
        f"; the other {_n(total - shown)} are in the full report (below)" if total > shown else ""
    )
    lines.append(f'<p class="note" id="problems-shown">{which}, in input order{more}.</p>')
    lines.append(
        '<table class="rows"><tr><th>account</th><th>Stripe account</th><th>outcome</th>'
        '<th class="n">attempts</th><th class="n">HTTP</th><th>code</th><th>message</th>'
        "<th>request ID</th><th>at (UTC)</th></tr>"
    )
    lines += [_problem_row(row) for row in audit.problems]
    return [*lines, "</table></section>"]


def _problem_row(row: ReportRow) -> str:
    message = row.error_message or ""
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "…"
    at = _when(row.updated_at) if row.updated_at is not None else ""
    return (
        f'<tr><td class="id account">{_text(row.account_id)}</td>'
        f'<td class="id">{_text(row.stripe_account)}</td><td>{_text(row.outcome)}</td>'
        f'<td class="n">{_n(row.attempts)}</td><td class="n">{_text(row.http_status)}</td>'
        f"<td><code>{_text(row.error_code)}</code></td>"
        f'<td class="msg">{_text(message)}</td><td class="id">{_text(row.request_id)}</td>'
        f"<td>{at}</td></tr>"
    )


def _full_report(audit: Audit) -> list[str]:
    command = shlex.join(
        [
            "bulkdisconnect", "report", "--job", audit.job, "--state", audit.store,
            "--format", "csv", "--output", f"{audit.job}-report.csv",
        ]
    )  # fmt: skip
    return [
        '<section id="full-report"><h2>The full report</h2>',
        (
            "<p>One row per account (outcome, attempts, HTTP status, Stripe's code, message "
            "and request ID, times, confirming event), as CSV:</p>"
        ),
        f'<pre class="command">{_text(command)}</pre>',
        (
            '<p class="note">Add <code>--unconfirmed</code> for only the disconnected accounts '
            "no Stripe event confirmed; <code>--format jsonl</code> for JSON lines.</p></section>"
        ),
    ]


def _style() -> str:
    return resources.files(__package__).joinpath("page.css").read_text(encoding="utf-8")


def _text(value: object) -> str:
    """A value for the page: escaped, control and direction characters shown as U+FFFD."""
    if value is None:
        return ""
    return html.escape(_CONTROL.sub("\ufffd", str(value)), quote=True)


def _n(n: int) -> str:
    return f"{n:,}"


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else ""


def _swatch(outcome: str | None) -> str:
    colour = charts.COLOURS.get(outcome, "#a0aec0")
    return f'<span class="swatch" style="background:{colour}"></span>'


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _took(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
