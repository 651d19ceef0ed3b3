"""`report --format html`: one self-contained page that tells the truth about a job.

The page is loaded in a real headless Chromium (tests/browser.py) with the network cut off;
the figures it shows are read from the rendered page and compared with `status`.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import anyio
import pytest

from bulkdisconnect.model import Outcome, RunStats
from bulkdisconnect.report_html import charts, facts
from bulkdisconnect.report_html.facts import Sample, Timeline
from bulkdisconnect.sampler import keep_sampling
from bulkdisconnect.sandbox import SandboxThread
from bulkdisconnect.store import open_store
from tests.browser import Chromium
from tests.support import FAST, Workspace

REVOKED = "acct_1Revoked"
HOSTILE_ID = "<img src=x onerror=alert(1)>"
HOSTILE_ACCOUNT = "acct_\u202eevil<b>"
OUTCOMES = ("disconnected", "not_found", "invalid_id", "failed", "pending")


def platform_job(ws: Workspace, sandbox: SandboxThread) -> Path:
    """A finished job with every outcome: two connected accounts and one revoked, accounts
    Stripe does not have, hostile input values, 429 answers on the way."""
    ids = [("", f"fca_own{n:04d}") for n in range(60)]
    ids += [("acct_1Alpha", f"fca_alpha{n:04d}") for n in range(40)]
    ids += [(REVOKED, f"fca_revoked{n:04d}") for n in range(5)]
    ids += [("", HOSTILE_ID), (HOSTILE_ACCOUNT, "fca_spoofed1"), ("", "fca_x\x1b[2J")]
    path = ws.write("accounts.csv", ["stripe_account,account_id", *(f"{a},{i}" for a, i in ids)])
    sandbox.sandbox.configure(
        missing=frozenset({"fca_own0007", "fca_alpha0003"}),
        revoked_accounts=frozenset({REVOKED}),
        p429=0.1,
        event_drop_share=0.2,
        reactivate_share=0.1,
        seed=11,
    )
    result = ws.run("run", "--input", str(path), "--job", "audit", "--rate", "2000", *FAST)
    assert result.exit_code == 1, result.stderr
    return path


def checked(ws: Workspace) -> None:
    """Confirm the job's disconnects from Stripe's events, and read back those left."""
    fast = ("--rate", "2000", "--retry-delay", "0", "--retry-max-delay", "0")
    reconciled = ws.run("reconcile", "--job", "audit", *fast)
    assert reconciled.exit_code in (0, 1), reconciled.stderr
    verified = ws.run("verify", "--job", "audit", "--unconfirmed", *fast)
    assert verified.exit_code == 1, verified.stderr  # some are active again


def html_report(ws: Workspace, job: str, *extra: str) -> str:
    """Write the job's HTML report with the CLI; its text."""
    out = ws.root / f"{job}.html"
    result = ws.run("report", "--job", job, "--format", "html", "--output", str(out), *extra)
    assert result.exit_code == 0, result.stderr
    assert "wrote the HTML report of" in result.stderr
    return out.read_text(encoding="utf-8")


def status_figures(text: str) -> dict[str, int]:
    """The figures `status` prints, by the ids the page gives them."""
    (total,) = re.findall(r"^job \S+: (\d+) accounts$", text, flags=re.MULTILINE)
    counts = re.search(
        r"disconnected (\d+), not_found (\d+), invalid_id (\d+), failed (\d+), pending (\d+)", text
    )
    proof = re.search(
        r"confirmed (\d+), unconfirmed (\d+); events for accounts outside the job (\d+)", text
    )
    verify = re.search(r"verified (\d+), reactivated (\d+), never read back (\d+)", text)
    assert counts is not None, text
    assert proof is not None, text
    assert verify is not None, text
    figures = {"count-total": int(total)}
    figures |= {f"count-{o}": int(n) for o, n in zip(OUTCOMES, counts.groups(), strict=True)}
    labels = ("proof-confirmed", "proof-unconfirmed", "proof-unknown-events")
    figures |= {label: int(n) for label, n in zip(labels, proof.groups(), strict=True)}
    labels = ("verify-verified", "verify-reactivated", "verify-unverified")
    figures |= {label: int(n) for label, n in zip(labels, verify.groups(), strict=True)}
    return figures


def status_lanes(text: str) -> dict[str, list[int]]:
    """`status`'s counts per connected account, in OUTCOMES order."""
    lanes = re.findall(
        r"^    (\S+): disconnected (\d+), not_found (\d+), invalid_id (\d+), failed (\d+), "
        r"pending (\d+)$",
        text,
        flags=re.MULTILINE,
    )
    return {name: [int(n) for n in counts] for name, *counts in lanes}


FIGURES_JS = """JSON.stringify(Object.fromEntries(
    [...document.querySelectorAll('[id^="count-"], [id^="proof-"], [id^="verify-"]')]
        .map(e => [e.id, e.innerText])))"""
LANES_JS = """JSON.stringify([...document.querySelectorAll('#lanes table tr')].slice(1)
    .map(tr => [...tr.querySelectorAll('td')].map(td => td.innerText)))"""


def test_the_page_in_a_browser_shows_what_status_says_and_fetches_nothing(
    ws: Workspace, sandbox: SandboxThread, chromium: str, tmp_path: Path
) -> None:
    """Loaded offline in Chromium, the page requests nothing but itself, logs no error, draws
    its charts, and its totals, proof and per-account counts equal `status`'s."""
    import json

    platform_job(ws, sandbox)
    checked(ws)
    page_file = ws.root / "audit.html"
    html_report(ws, "audit")
    status = ws.run("status", "--job", "audit").stdout

    with Chromium(chromium, tmp_path / "profile") as browser:
        page = browser.page()
        loaded = page.load(page_file.as_uri())
        assert loaded.requests == [page_file.as_uri()]
        assert loaded.errors == []
        shown = json.loads(page.evaluate(FIGURES_JS))
        lanes = json.loads(page.evaluate(LANES_JS))
        svgs = page.evaluate("document.querySelectorAll('figure svg').length")
        problems = page.evaluate("document.querySelector('#problems').innerText")
        injected = page.evaluate("document.querySelectorAll('img, script, b').length")

    assert {k: int(v.replace(",", "")) for k, v in shown.items()} == status_figures(status)
    page_lanes = {row[0]: [int(n.replace(",", "")) for n in row[1:6]] for row in lanes}
    # The page shows a direction override as U+FFFD; status prints what is stored.
    expected = {name.replace("\u202e", "\ufffd"): n for name, n in status_lanes(status).items()}
    assert len(expected) == 4  # the own account, Alpha, the revoked one, the spoofed one
    assert page_lanes == expected
    assert svgs == 3  # activity, rate against target, per connected account
    assert HOSTILE_ID in problems  # shown as text...
    assert injected == 0  # ...never as markup
    assert "account_invalid" in problems
    figures = status_figures(status)
    assert figures["proof-confirmed"] > 0
    assert figures["verify-verified"] > 0
    assert figures["verify-reactivated"] > 0


def test_a_harness_that_sees_fetches_and_errors(chromium: str, tmp_path: Path) -> None:
    """The browser harness is not blind: a page that fetches and logs an error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><body><img src='http://example.invalid/x.png'>"
        "<script>console.error('boom')</script></body></html>"
    )
    with Chromium(chromium, tmp_path / "profile") as browser:
        loaded = browser.page().load(bad.as_uri())
    assert "http://example.invalid/x.png" in loaded.requests
    assert "boom" in loaded.errors


def test_stored_values_are_escaped_and_the_page_is_self_contained(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Account IDs, connected accounts and messages are escaped, control and direction
    characters made visible; the page has no script and no reference outside itself."""
    platform_job(ws, sandbox)
    text = html_report(ws, "audit")
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<img" not in text
    assert "<script" not in text.lower()
    assert "\u202e" not in text
    assert "\x1b" not in text
    assert "fca_x\ufffd[2J" in text
    assert "default-src 'none'" in text  # the Content-Security-Policy
    references = re.findall(r'(?:href|src)="([^"]*)"', text)
    assert all(ref.startswith("#") for ref in references), references


def test_the_page_says_what_the_accounts_were_read_from(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """The job's source: a query with its database (a password masked), kept by the run;
    `forget` removes it with the job."""
    del sandbox
    db = ws.root / "crm.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE closed (account TEXT)")
        conn.execute("INSERT INTO closed VALUES ('fca_q1')")
        conn.commit()
    query = "SELECT account AS account_id\n  FROM closed"
    run = ws.run("run", "--db", f"sqlite:///{db}", "--query", query, "--job", "q", *FAST)
    assert run.exit_code == 0, run.stderr
    text = html_report(ws, "q")
    shown = f"sqlite:///{db}: SELECT account AS account_id FROM closed"  # noqa: S608 - text
    assert f'<code id="source">{shown}</code>' in text
    assert ws.run("forget", "--job", "q", "--yes").exit_code == 0
    with contextlib.closing(sqlite3.connect(ws.state("q"))) as conn:
        assert conn.execute("SELECT key FROM meta WHERE key LIKE 'source:%'").fetchall() == []


def test_the_first_thousand_problems_are_listed_and_the_rest_counted(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Of 1,005 invalid values the page lists the first 1,000 in input order, and says
    where the other 5 are."""
    del sandbox
    path = ws.write("ids.txt", [f"bad-{n:04d}" for n in range(1005)] + ["fca_good1"])
    assert ws.run("run", "--input", str(path), "--job", "many", *FAST).exit_code == 1
    text = html_report(ws, "many")
    assert len(re.findall(r'<td class="id account">bad-\d{4}</td>', text)) == 1000
    assert "bad-0999" in text
    assert "bad-1000" not in text
    assert "The first 1,000 of 1,005, in input order; the other 5 are in the full report" in text
    assert "bulkdisconnect report --job many --state" in text
    assert "--format csv" in text


def test_a_run_samples_its_counters_for_the_charts(ws: Workspace, sandbox: SandboxThread) -> None:
    """A run records its counters when it starts and when it ends: the last sample holds
    every request and disconnect it made."""
    sandbox.sandbox.configure(p429=0.1, seed=5)
    path = ws.write("ids.txt", ws.ids(200))
    run = ("run", "--input", str(path), "--job", "sampled", "--rate", "1000", *FAST)
    assert ws.run(*run).exit_code == 0

    async def read() -> list[tuple[str, float, int, int, int, float]]:
        store = await open_store(ws.state("sampled"), read_only=True)
        try:
            return await store.samples("sampled")
        finally:
            await store.aclose()

    samples = anyio.run(read)
    journal = sandbox.sandbox.journal_snapshot()
    assert len(samples) >= 2
    assert len({run_id for run_id, *_ in samples}) == 1
    assert [at for _, at, *_ in samples] == sorted(at for _, at, *_ in samples)
    _, _, requests, rate_limited, disconnected, target = samples[-1]
    assert requests == len(journal)
    assert rate_limited == sum(1 for entry in journal if entry.status == 429) > 0
    assert disconnected == 200
    assert target > 0


class SampleList:
    """A store that keeps samples in a list."""

    def __init__(self, *, wanted: int) -> None:
        self.samples: list[dict[str, object]] = []
        self.enough = anyio.Event()  # set once `wanted` samples came
        self._wanted = wanted

    async def record_sample(self, job: str, run_id: str, **counters: object) -> None:
        """Keep one sample."""
        self.samples.append({"job": job, "run_id": run_id, **counters})
        if len(self.samples) >= self._wanted:
            self.enough.set()


@pytest.mark.anyio
async def test_the_sampler_samples_while_the_run_works_and_once_more_at_its_end() -> None:
    """Samples come every interval while the run works, and the last, taken when the run
    stops, holds its final counters."""
    store, stats = SampleList(wanted=3), RunStats()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(keep_sampling, store, "j", "r1", stats, every=0.001))
        await store.enough.wait()
        stats.requests, stats.rate_limited, stats.current_rate = 7, 2, 12.5
        stats.outcomes[Outcome.DISCONNECTED] = 5
        tg.cancel_scope.cancel()
    assert store.samples[0]["requests"] == 0
    assert store.samples[-1] == {
        "job": "j",
        "run_id": "r1",
        "at": store.samples[-1]["at"],
        "requests": 7,
        "rate_limited": 2,
        "disconnected": 5,
        "target_rate": 12.5,
    }


def test_the_html_report_reads_a_postgresql_store(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """The page's queries run on PostgreSQL too: its totals equal `status`'s."""
    sandbox.sandbox.configure(missing=frozenset({"fca_acct000004"}))
    path = ws.write("ids.txt", [*ws.ids(50), "nope"])
    state = ["--state", pg_state]
    assert ws.run("run", "--input", str(path), "--job", "pg", *state, *FAST).exit_code == 1
    text = html_report(ws, "pg", *state)
    status = status_figures(ws.run("status", "--job", "pg", *state).stdout)
    for figure, n in status.items():
        assert f'id="{figure}">{n:,}<' in text, figure
    assert text.count("<svg") == 2  # activity, rates


def test_html_without_matplotlib_says_how_to_get_it(
    ws: Workspace, sandbox: SandboxThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the charting library the command fails in one line naming the extra, and
    leaves no file behind."""
    del sandbox
    path = ws.write("ids.txt", ws.ids(3))
    assert ws.run("run", "--input", str(path), "--job", "nolib", *FAST).exit_code == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = ws.root / "nolib.html"
    result = ws.run("report", "--job", "nolib", "--format", "html", "--output", str(out))
    assert result.exit_code == 2
    assert "pip install 'bulkdisconnect[html]'" in result.stderr
    assert list(ws.root.glob("nolib.html*")) == []


def test_html_lists_no_rows_so_unconfirmed_is_refused(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """--unconfirmed selects rows to list: with --format html it is a usage error."""
    del sandbox
    result = ws.run("report", "--job", "x", "--format", "html", "--unconfirmed")
    assert result.exit_code == 2
    assert "--unconfirmed" in result.stderr


# -- the figures, without a store -------------------------------------------------------------


def test_samples_are_spread_over_the_buckets_they_span() -> None:
    """What a run did between two samples lands in the buckets between them, in proportion,
    and runs sharing a job add up: requests per second and target are averages per bucket."""
    samples: Sequence[Sample] = [
        ("a", 100.0, 0, 0, 0, 10.0),
        ("a", 110.0, 100, 4, 90, 10.0),
        ("b", 105.0, 0, 0, 0, 5.0),
        ("b", 110.0, 25, 0, 25, 5.0),
    ]
    rate_limited, requests, target = facts.spread_samples(samples, 100.0, 5.0, 2)
    assert requests == [50.0, 75.0]
    assert rate_limited == [2.0, 2.0]
    assert target == [50.0, 75.0]  # rate x seconds: 10/s for 5 s; 10/s + 5/s for 5 s


def test_bucket_widths_are_round_and_about_a_hundred_and_twenty_across() -> None:
    """A bucket is a round duration, about 1/120 of the job's span, at least the sampling
    interval."""
    assert facts.bucket_width(10) == 5
    assert facts.bucket_width(3600) == 30
    assert facts.bucket_width(14 * 3600) == 600
    assert facts.bucket_width(400 * 86400) == 7 * 86400
    assert facts.bucket_width(10 * 365 * 86400) == 31 * 86400


def test_a_chart_is_as_large_for_a_million_accounts_as_for_ten() -> None:
    """The charts draw buckets, never accounts: their size does not grow with the job."""

    def timeline(scale: int) -> Timeline:
        width = 60.0
        return Timeline(
            start=1_800_000_000.0,
            width=width,
            disconnected=[scale * (i % 7) for i in range(120)],
            rate_limited=[float(scale * (i % 3)) for i in range(120)],
            request_rate=[scale * 7 / width] * 120,
            target_rate=[scale * 8 / width] * 120,
            sampled=True,
        )

    small, large = charts.activity(timeline(1)), charts.activity(timeline(100_000))
    assert small.startswith("<svg")
    assert large.startswith("<svg")
    assert len(large) < 1.2 * len(small) < 80_000


def test_a_job_with_nothing_disconnected_yet_has_no_timeline(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A job of invalid values only says so instead of drawing empty charts."""
    del sandbox
    path = ws.write("ids.txt", ["nope", "nada"])
    assert ws.run("run", "--input", str(path), "--job", "empty", *FAST).exit_code == 1
    with sqlite3.connect(ws.state("empty")) as db:
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone() == (0,)
    text = html_report(ws, "empty")
    assert "No disconnect recorded yet." in text
    assert "<svg" not in text
