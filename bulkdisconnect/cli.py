"""The command line: parse, build the config, call; no logic of its own."""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import anyio
import click

from bulkdisconnect import __version__, early
from bulkdisconnect.config import default
from bulkdisconnect.errors import BulkDisconnectError, ExitCode, StoreError, UsageError

if TYPE_CHECKING:
    from bulkdisconnect.store.core import SqlStore

T = TypeVar("T")

# Not stripe-mock's 12111, which users of Stripe's tooling often have running.
SANDBOX_PORT = 12180


def _run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; our errors become a one-line message and their exit code."""
    from bulkdisconnect.logs import redact_text

    try:
        return anyio.run(fn)
    except BulkDisconnectError as exc:
        click.echo(f"bulkdisconnect: error: {redact_text(str(exc))}", err=True)
        sys.exit(int(exc.exit_code))


# The commands that take over the stop signals remembered since start-up (see early.py).
_RUNS = ("run", "plan", "reconcile", "verify")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bulkdisconnect")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Disconnect Stripe Financial Connections accounts in bulk, resumably, within a rate limit."""
    if ctx.invoked_subcommand not in _RUNS:
        early.restore_default()


def _setting(flag: str, kind: type[float] | type[int], text: str) -> Callable[[Any], Any]:
    """A numeric option whose help shows its default (written once, in config.FIELDS)."""
    value = default(flag.removeprefix("--").replace("-", "_"))
    return click.option(flag, type=kind, help=f"{text} [{value:g}].")


# How to reach Stripe, and how fast and patiently: a run's and reconcile's and verify's.
_STRIPE_OPTIONS = [
    click.option("--api-base", metavar="URL", help="[env STRIPE_API_BASE, else api.stripe.com]"),
    click.option("--api-key-file", metavar="PATH", help="Read the key here [env STRIPE_API_KEY]."),
    click.option(
        "--stripe-account",
        metavar="ID",
        help="Stripe-Account of the job's rows that name none (Connect).",
    ),
    click.option("--stripe-version", metavar="VERSION", help="Override the pinned Stripe-Version."),
    click.option(
        "--proxy", metavar="URL", help="Egress proxy [env HTTPS_PROXY/HTTP_PROXY, NO_PROXY]."
    ),
    click.option(
        "--ca-bundle", metavar="PATH", help="PEM file of CAs to trust [system, SSL_CERT_FILE]."
    ),
    _setting("--rate", float, "Max requests per second, per Stripe account"),
    click.option("--total-rate", type=float, help="Max requests per second across all of them."),
    _setting("--max-attempts", int, "Attempts per request, first included"),
    _setting("--timeout", float, "Total seconds per request"),
    _setting("--connect-timeout", float, "Seconds to connect"),
    _setting("--retry-delay", float, "First backoff delay in seconds"),
    _setting("--retry-max-delay", float, "Longest backoff delay in seconds"),
]
# Options a plan needs (the source, the job, and what listing customers through the API
# takes); the same names as the job file's keys.
_PLAN_OPTIONS = [
    click.argument("job_file", required=False, type=click.Path(path_type=Path)),
    click.option(
        "--input", "input_", metavar="PATH", help=".txt, .csv, .jsonl (optionally .gz); - = stdin."
    ),
    click.option("--db", metavar="URL", help="sqlite:///path or postgresql://… for --query."),
    click.option("--query", metavar="SQL", help="Yields account IDs; :name binds a --param."),
    click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Repeatable."),
    click.option(
        "--customer", multiple=True, metavar="cus_…", help="List this customer's accounts."
    ),
    click.option(
        "--customers",
        metavar="FILE",
        help="Customer IDs, one a line, or a CSV of customer_id[,stripe_account].",
    ),
    click.option(
        "--holder-account",
        multiple=True,
        metavar="acct_…",
        help="Offboard it: list and disconnect the accounts it holds.",
    ),
    click.option("--holder-accounts", metavar="FILE", help="Connected account IDs, one a line."),
    click.option("--column", metavar="NAME", help="CSV column / JSONL field / SQL column."),
    click.option(
        "--account-column",
        metavar="NAME",
        help="Each row's connected account (acct_…) [stripe_account, if present].",
    ),
    click.option(
        "--job", metavar="NAME", help="The key a rerun resumes under [job file/input name]."
    ),
    click.option(
        "--state", metavar="PATH|URL", help="SQLite file or postgresql://… [state/<job>.sqlite]."
    ),
    click.option(
        "--retry-failed", is_flag=True, default=None, help="Call the failed accounts again."
    ),
    *_STRIPE_OPTIONS,
    click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto"),
]
# Options that only a run that disconnects uses.
_RUN_ONLY_OPTIONS = [
    click.option("--dry-run", is_flag=True, default=None, help="Plan only: no disconnect."),
    click.option("--yes", is_flag=True, default=None, help="Go ahead with a live key, no prompt."),
    click.option("--max-accounts", type=int, help="Refuse if more accounts than this are to call."),
    click.option(
        "--join", is_flag=True, default=None, help="Work the job with other --join workers (PG)."
    ),
    click.option("--concurrency", type=int, help="Max requests in flight [adapts to latency]."),
    _setting("--grace", float, "Seconds in flight get after a stop signal"),
    _setting("--breaker-min-sample", int, "Answers before the breaker may trip"),
    _setting("--breaker-threshold", float, "Bad share that trips it; 1 = off"),
    _setting("--lock-stale-after", float, "Seconds without heartbeat: stale"),
    click.option("--metrics-file", metavar="PATH", help="Prometheus textfile (node_exporter)."),
    click.option("--pushgateway", metavar="URL", help="Push Prometheus metrics here."),
    click.option("--progress/--no-progress", default=True, help="Progress bar or log lines."),
    click.option(
        "--reconcile",
        is_flag=True,
        default=None,
        help="Then confirm the disconnects from Stripe's events (see `reconcile`).",
    ),
    _setting("--reconcile-wait", float, "Seconds --reconcile waits for missing events"),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Callable[..., None]], Any]:
    """Apply click options to a command, in the order listed."""

    def decorate(command: Callable[..., None]) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


_RUN_EPILOG = """\b
Examples:
  bulkdisconnect run --input offboarded.csv --job offboarding-2026-11 --rate 50
  bulkdisconnect run jobs/retention-purge.toml --yes
  bulkdisconnect run --db sqlite:///app.db --query "SELECT account_id FROM bank" --job purge
  bulkdisconnect run --holder-account acct_1Nv0FGQ9RKHgCVdK --job offboard-acct
  bulkdisconnect run --customers customers.csv --job offboarding  # customer_id,stripe_account

\b
Exit codes:
  0  every valid account ended disconnected or not_found
  1  finished; some accounts failed or were invalid (see report; --retry-failed)
  2  usage, configuration or input error; nothing was called
  3  interrupted by SIGINT/SIGTERM; a rerun resumes
  4  another run holds the job, or this run lost its lease
  5  the API refused the run (key, mode, breaker) or cannot be reached; nothing marked failed
  6  the state store failed mid-run (disk, I/O, database down); nothing lost, a rerun resumes
"""


@main.command(epilog=_RUN_EPILOG)
@_with(_PLAN_OPTIONS + _RUN_ONLY_OPTIONS)
def run(
    job_file: Path | None, input_: str | None, log_format: str, progress: bool, **flags: Any
) -> None:
    """Disconnect every account of the source; resumes the job if it ran before."""
    _run_job(job_file, {**flags, "input": input_}, log_format=log_format, progress=progress)


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect plan --input offboarded.csv --job offboarding-2026-11
  bulkdisconnect plan jobs/retention-purge.toml
  bulkdisconnect plan --customers offboarded-customers.txt --job offboarding
"""
)
@_with(_PLAN_OPTIONS)
def plan(job_file: Path | None, input_: str | None, log_format: str, **flags: Any) -> None:
    """Read the whole source and print the plan (same as run --dry-run): no disconnect.

    A customers source still makes its list calls.
    """
    flags = {**flags, "input": input_, "dry_run": True}
    _run_job(job_file, flags, log_format=log_format, progress=False)


def _run_job(
    job_file: Path | None, flags: dict[str, Any], *, log_format: str, progress: bool
) -> None:
    from bulkdisconnect import logs
    from bulkdisconnect.config import build_run_config
    from bulkdisconnect.job import RunHooks, run_job

    logs.configure(json=None if log_format == "auto" else log_format == "json")

    async def go() -> ExitCode:
        config = build_run_config(flags, job_file, os.environ)
        # A live-key prompt needs a person at a terminal, and stdin free of input.
        can_ask = sys.stdin.isatty() and sys.stderr.isatty() and not config.reads_stdin
        hooks = RunHooks(
            out=sys.stdout,
            progress=progress,
            stdin=sys.stdin.buffer,
            confirm=(lambda question: click.confirm(question, err=True)) if can_ask else None,
        )
        return await run_job(config, hooks)

    sys.exit(int(_run_async(go)))


def _state_for(job: str, state: str | None) -> Path | str:
    from bulkdisconnect.config import JOB_NAME, resolve_state

    if not JOB_NAME.fullmatch(job):
        raise UsageError(f"--job must be letters, digits, '.', '_' or '-', got {job!r}")
    location = resolve_state(job, state)
    if isinstance(location, Path) and not location.is_file():
        raise UsageError(f"no state store at {location}: has job {job!r} ever run? (see --state)")
    return location


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect report --job offboarding-2026-11 --format csv --output report.csv
  bulkdisconnect report --job offboarding-2026-11 --unconfirmed
  bulkdisconnect report --job offboarding-2026-11 --format html --output purge.html
  bulkdisconnect report --job purge --state postgresql://bd@db/ops | gzip > purge.jsonl.gz

\b
--format html writes one page for the people who sign off a purge (it opens offline):
totals, proof of disconnection, runs, charts over time, the first 1,000 failed and
invalid accounts. It needs matplotlib: pip install 'bulkdisconnect[html]'.
"""
)
@click.option("--job", required=True, metavar="NAME")
@click.option("--state", metavar="PATH|URL", help="[state/<job>.sqlite]")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "html"]), default="jsonl")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="[stdout]")
@click.option(
    "--unconfirmed", is_flag=True, help="Only disconnected accounts no webhook event confirmed."
)
def report(job: str, state: str | None, fmt: str, output: Path | None, unconfirmed: bool) -> None:
    """One row per account: outcome, attempts, HTTP status, error, request ID, times."""
    from bulkdisconnect.report import write_report

    if fmt == "html" and unconfirmed:
        raise click.UsageError("--unconfirmed lists rows: use it with --format csv or jsonl")

    async def write(store: SqlStore, out: TextIO) -> str:
        if fmt != "html":
            return f"{await write_report(store, job, out, fmt, unconfirmed=unconfirmed)} rows"
        from bulkdisconnect.report_html import write_html_report
        from bulkdisconnect.report_html.charts import ChartsUnavailableError
        from bulkdisconnect.store import shown_location

        where = shown_location(_state_for(job, state))
        try:
            audit = await write_html_report(store, job, out, location=where)
        except ChartsUnavailableError:
            raise UsageError(
                "report --format html draws its charts with matplotlib, which is not "
                "installed: pip install 'bulkdisconnect[html]'"
            ) from None
        return f"the HTML report of {audit.total} accounts"

    async def go() -> None:
        async with _job_store(job, state) as store:
            if output is None:
                await write(store, sys.stdout)
                return
            tmp = output.with_name(output.name + ".partial")
            try:
                with tmp.open("w", encoding="utf-8", newline="") as out:
                    tmp.chmod(0o600)  # before a row is written: it lists customers' accounts
                    what = await write(store, out)
                tmp.replace(output)
            except OSError as exc:
                raise UsageError(f"cannot write the report to {output}: {exc.strerror}") from None
            finally:
                tmp.unlink(missing_ok=True)
            click.echo(f"wrote {what} to {output}", err=True)

    _run_async(go)


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect forget --job offboarding-2026-11
  bulkdisconnect forget --finished-before 2026-08-01 --yes
  bulkdisconnect forget --finished-before 2026-08-01 --state postgresql://bd@db/ops --yes

\b
Refused (exit 4) while a run holds the job. A SQLite file is rebuilt afterwards, so
the deleted IDs are not left in its free pages.
"""
)
@click.option("--job", metavar="NAME", help="The job to forget.")
@click.option(
    "--finished-before",
    metavar="DATE",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Every job whose last run finished (exit 0 or 1) before this UTC date.",
)
@click.option(
    "--state",
    metavar="PATH|URL",
    help="[state/<job>.sqlite; with --finished-before, every store in state/]",
)
@click.option("--yes", is_flag=True, help="Do not ask first.")
def forget(
    job: str | None, finished_before: datetime.datetime | None, state: str | None, yes: bool
) -> None:
    """Delete what a store holds of a job: its accounts, runs and webhook confirmations."""
    from bulkdisconnect.errors import LockHeldError
    from bulkdisconnect.store import shown_location as shown

    if (job is None) == (finished_before is None):
        raise click.UsageError("give --job NAME or --finished-before DATE (one of them)")

    async def go() -> None:
        if job is not None:
            location = _state_for(job, state)
            async with _job_store(job, state, read_only=False) as store:
                _confirm_forget([job], shown(location), yes=yes)
                await _forget(store, job, shown(location))
            return
        assert finished_before is not None
        before = finished_before.replace(tzinfo=datetime.UTC).timestamp()
        refused = False
        for location in _stores(state):
            async with _opened_store(location) as store:
                jobs = await store.jobs_finished_before(before)
                if not jobs:
                    continue
                _confirm_forget(jobs, shown(location), yes=yes)
                for name in jobs:
                    try:
                        await _forget(store, name, shown(location))
                    except LockHeldError as exc:
                        click.echo(f"bulkdisconnect: {exc}: not forgotten", err=True)
                        refused = True
        if refused:
            raise LockHeldError("some jobs were held by a run and were not forgotten")

    _run_async(go)


def _confirm_forget(jobs: list[str], where: str, *, yes: bool) -> None:
    """Ask before deleting records (refuse without a terminal, unless --yes)."""
    if yes:
        return
    question = f"Forget {len(jobs)} job(s) in {where} ({', '.join(jobs[:10])}): delete for good?"
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(f"{question} Pass --yes to confirm without a terminal")
    if not click.confirm(question, err=True):
        raise UsageError("nothing forgotten")


async def _forget(store: SqlStore, job: str, where: str) -> None:
    forgotten = await store.forget(job, f"forget-{uuid.uuid4().hex[:8]}")
    click.echo(
        f"forgot job {job} in {where}: {forgotten.accounts} accounts, {forgotten.runs} runs, "
        f"{forgotten.confirmations} confirmation events"
    )


def _stores(state: str | None) -> list[Path | str]:
    """The stores --finished-before looks in: --state, else every SQLite file in state/."""
    from bulkdisconnect.config import default_state, resolve_state

    if state:
        return [resolve_state("any", state)]
    return sorted(default_state("any").parent.glob("*.sqlite"))


@contextlib.asynccontextmanager
async def _opened_store(location: Path | str) -> AsyncIterator[SqlStore]:
    from bulkdisconnect.store import open_store

    try:
        store = await open_store(location, create=False)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


# Options of the commands that check a job against Stripe (reconcile, verify): how to reach
# it and how fast, as a run's; a job file's source keys are ignored.
_CHECK_OPTIONS = [
    click.argument("job_file", required=False, type=click.Path(path_type=Path)),
    click.option("--job", metavar="NAME", help="The job to check [the job file's name]."),
    click.option(
        "--state", metavar="PATH|URL", help="SQLite file or postgresql://… [state/<job>.sqlite]."
    ),
    *_STRIPE_OPTIONS,
    _setting("--lock-stale-after", float, "Seconds without heartbeat: stale"),
    click.option(
        "--metrics-file",
        metavar="PATH",
        help="Prometheus textfile (one of its own, not the run's).",
    ),
    click.option("--pushgateway", metavar="URL", help="Push Prometheus metrics here."),
    click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto"),
]


def _check(
    command: str, job_file: Path | None, flags: dict[str, Any], log_format: str, **what: Any
) -> None:
    """Build the check's config and run it (reconcile or verify); exit with its code."""
    from bulkdisconnect import logs
    from bulkdisconnect.config import build_check_config

    logs.configure(json=None if log_format == "auto" else log_format == "json")

    async def go() -> ExitCode:
        config = build_check_config(flags, job_file, os.environ)
        if command == "reconcile":
            from bulkdisconnect.reconcile import reconcile_job

            return await reconcile_job(config, sys.stdout, **what)
        from bulkdisconnect.verify import verify_job

        return await verify_job(config, sys.stdout, **what)

    sys.exit(int(_run_async(go)))


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect reconcile --job offboarding-2026-11
  bulkdisconnect reconcile jobs/retention-purge.toml --metrics-file /var/lib/node/reconcile.prom
  bulkdisconnect run --input offboarded.csv --job offboarding-2026-11 --reconcile

\b
Reads GET /v1/events?type=financial_connections.account.disconnected from a little before
the job's first attempt, 100 a page, under each connected account's Stripe-Account, within
--rate, and records each event of the job's accounts as the webhook receiver does (once).
A rerun reads only what is new. Stripe keeps events 30 days: read older jobs back with
`verify`. Holds the job's lock, as a run does.

\b
Exit codes: 0 done; 1 a connected account refused the platform; 2 usage; 3 interrupted (a
rerun goes on); 4 the job is held; 5 the API refused (key, or listing kept failing); 6 store.
"""
)
@_with(_CHECK_OPTIONS)
@click.option(
    "--full",
    is_flag=True,
    help="Read every event since the first attempt again, not only new ones.",
)
def reconcile(job_file: Path | None, log_format: str, full: bool, **flags: Any) -> None:
    """Confirm the job's disconnects from Stripe's Events API: no webhook needed."""
    _check("reconcile", job_file, flags, log_format, full=full)


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect verify --job offboarding-2026-11                # the unconfirmed accounts
  bulkdisconnect verify --job offboarding-2026-11 --sample 500
  bulkdisconnect verify --job offboarding-2026-11 --all --rate 50

\b
Retrieves each chosen account recorded disconnected (GET /v1/financial_connections/
accounts/{id}) and records what Stripe reports: disconnected or inactive is verified; active
is flagged (status and the report show it). An interrupted pass (SIGTERM) is resumed by the
next verify of the same selection; one that ended is followed by a new pass. Holds the job's
lock, as a run does.

\b
Exit codes: 0 every account read back is verified; 1 some are active again (or could not be
read); 2 usage; 3 interrupted (a rerun goes on); 4 the job is held; 5 the API refused; 6 store.
"""
)
@_with(_CHECK_OPTIONS)
@click.option("--unconfirmed", "which", flag_value="unconfirmed", default=True, help="[default]")
@click.option("--all", "which", flag_value="all", help="Every account recorded disconnected.")
@click.option("--sample", type=click.IntRange(min=1), metavar="N", help="N of them, at random.")
@click.option("--concurrency", type=int, help="Max requests in flight [adapts to latency].")
@_setting("--grace", float, "Seconds in flight get after a stop signal")
def verify(
    job_file: Path | None, log_format: str, which: str, sample: int | None, **flags: Any
) -> None:
    """Read the job's accounts back from Stripe: disconnected, or active again?"""
    from bulkdisconnect.verify import Selection

    if sample is not None and which == "all":
        raise click.UsageError("--sample draws among all accounts: give it without --all")
    selection = Selection(unconfirmed=which == "unconfirmed" and sample is None, sample=sample)
    _check("verify", job_file, flags, log_format, selection=selection)


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect status --job offboarding-2026-11
  bulkdisconnect status --job purge --state postgresql://bd@db/ops?schema=bulkdisconnect
"""
)
@click.option("--job", required=True, metavar="NAME")
@click.option("--state", metavar="PATH|URL", help="[state/<job>.sqlite]")
def status(job: str, state: str | None) -> None:
    """Counts per outcome, webhook confirmations, the last run, who holds the job now."""
    from bulkdisconnect.report import write_status

    async def go() -> None:
        async with _job_store(job, state) as store:
            await write_status(store, job, sys.stdout)

    _run_async(go)


@contextlib.asynccontextmanager
async def _job_store(
    job: str, state: str | None, *, read_only: bool = True, planned: bool = False
) -> AsyncIterator[SqlStore]:
    """The store holding `job`; UsageError if it does not (with `planned`: no account yet).

    Opened `read_only` unless told (status and report write nothing); a store that cannot be
    read (corrupted, unreachable) is a UsageError naming it: these commands resume nothing.
    """
    from bulkdisconnect.store import open_store, shown_location

    location = _state_for(job, state)
    try:
        store = await open_store(location, read_only=read_only)
        try:
            where = shown_location(location)
            if not await store.has_job(job):
                raise UsageError(f"job {job!r} is not in {where}: check --job and --state")
            if planned and not sum((await store.counts(job)).values()):
                raise UsageError(
                    f"job {job!r} has no accounts in {where} yet: start the receiver once its "
                    "first run has planned it (Stripe retries the deliveries that failed "
                    "meanwhile)"
                )
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await store.aclose()
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def _first_webhook_secret() -> str:
    from bulkdisconnect.webhook import parse_secrets

    try:
        return parse_secrets(os.environ.get("STRIPE_WEBHOOK_SECRET"))[0]
    except BulkDisconnectError as exc:
        raise click.UsageError(str(exc)) from None


@main.command(
    epilog="""\b
Examples:
  STRIPE_WEBHOOK_SECRET=whsec_… bulkdisconnect webhook --job offboarding-2026-11 --port 8080
  bulkdisconnect webhook --job purge --state postgresql://bd@db/ops --host 0.0.0.0 --port 8080

\b
The job must have been planned by a run first: a receiver for a job the store does not
hold (a mistyped --job) would acknowledge every event and lose it. SIGINT or SIGTERM stops
it after the deliveries in progress, logging what it received.
"""
)
@click.option("--job", required=True, metavar="NAME")
@click.option("--state", metavar="PATH|URL", help="[state/<job>.sqlite]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True, help="0 picks a free port.")
@click.option("--path", default="/webhook", show_default=True)
def webhook(job: str, state: str | None, host: str, port: int, path: str) -> None:
    """Receive Stripe events and record disconnection confirmations for a job.

    Secrets come from env STRIPE_WEBHOOK_SECRET (comma-separated, for rotation).
    """
    import structlog

    from bulkdisconnect import logs
    from bulkdisconnect.serving import STOP_SIGNALS
    from bulkdisconnect.webhook import WebhookReceiver, parse_secrets, serve_webhook

    logs.configure()

    listening = False

    def ready(url: str) -> None:
        nonlocal listening
        listening = True
        click.echo(f"webhook listening on {url}")
        sys.stdout.flush()

    async def go() -> None:
        secrets = parse_secrets(os.environ.get("STRIPE_WEBHOOK_SECRET"))
        async with _job_store(job, state, read_only=False, planned=True) as store:
            receiver = WebhookReceiver(store, job, secrets)
            signal_name = None
            try:
                signal_name = await serve_webhook(
                    receiver,
                    host=host,
                    port=port,
                    path=path,
                    ready=ready,
                    stop_signals=STOP_SIGNALS,
                )
            finally:
                if listening:  # what it received, including events for accounts outside the job
                    structlog.get_logger("bulkdisconnect").info(
                        "bulkdisconnect.webhook.stopped",
                        job=job,
                        signal=signal_name,
                        **dict(receiver.counts),
                    )

    with contextlib.suppress(KeyboardInterrupt):
        _run_async(go)


@main.command(
    epilog="""\b
Examples:
  bulkdisconnect sandbox --latency-ms 40 --p500 0.01
  bulkdisconnect sandbox --port 0 --rate-limit 100 --p429 0.02
  bulkdisconnect sandbox --accounts owners.csv --rate-limit 25 --rate-limit-for acct_1Slow=5 \\
      --revoked-account acct_1Gone
  STRIPE_WEBHOOK_SECRET=whsec_… bulkdisconnect sandbox --webhook-url http://127.0.0.1:8080/webhook
  bulkdisconnect sandbox --p500-saved 0.05 --event-delay-seconds 30 --event-delay-share 0.2 \\
      --event-drop-share 0.01 --reactivate-share 0.01 --seed 7
"""
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=int, default=SANDBOX_PORT, show_default=True, help="0 picks a free port."
)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--jitter-ms", type=float, default=0.0, show_default=True)
@click.option(
    "--p500",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of 500 answers before anything is done (nothing saved under the key).",
)
@click.option(
    "--p500-saved",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of disconnects that are done, then answer a 500 saved under the "
    "Idempotency-Key (Stripe-Should-Retry: false).",
)
@click.option(
    "--p429",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of 429 rate_limit answers (the runner slows down on them, as on Stripe).",
)
@click.option("--p-lock-timeout", type=float, default=0.0, show_default=True)
@click.option(
    "--p-drop", type=float, default=0.0, show_default=True, help="Share of dropped connections."
)
@click.option(
    "--p-hang", type=float, default=0.0, show_default=True, help="Share of requests never answered."
)
@click.option(
    "--rate-limit",
    type=float,
    default=None,
    help="Server-side limit per Stripe account (the platform is one), requests/s.",
)
@click.option(
    "--rate-limit-for",
    "rate_limits",
    multiple=True,
    metavar="acct_…=N",
    help="This connected account's limit instead of --rate-limit (repeatable).",
)
@click.option(
    "--accounts",
    type=click.Path(exists=True, dir_okay=False),
    help="Only these IDs exist: one a line (the platform's), or a CSV with account_id and "
    "stripe_account columns (its owner; empty = the platform).",
)
@click.option(
    "--missing", type=click.Path(exists=True, dir_okay=False), help="These IDs do not exist."
)
@click.option(
    "--inactive",
    type=click.Path(exists=True, dir_okay=False),
    help="These accounts are inactive until disconnected.",
)
@click.option("--livemode-accounts", is_flag=True, help="Accounts live in live mode.")
@click.option("--revoke-after", type=int, default=None, help="Revoke the key after N calls.")
@click.option(
    "--revoked-account",
    "revoked_accounts",
    multiple=True,
    metavar="acct_…",
    help="This connected account revoked the platform's access: 403 account_invalid (repeatable).",
)
@click.option(
    "--event-delay-seconds",
    type=float,
    default=0.0,
    show_default=True,
    help="GET /v1/events lists an account's events this long after they happen.",
)
@click.option(
    "--event-delay-share",
    type=float,
    default=1.0,
    show_default=True,
    help="Share of accounts whose events --event-delay-seconds holds back.",
)
@click.option(
    "--event-drop-share",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of accounts whose events are never emitted (neither listed nor sent).",
)
@click.option(
    "--reactivate-share",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of disconnected accounts that read back active after their first disconnect.",
)
@click.option(
    "--seed", type=int, default=None, help="Seeds the faults, and the accounts the shares pick."
)
@click.option("--tls-cert", metavar="PEM", help="Serve https with this certificate (chain).")
@click.option("--tls-key", metavar="PEM", help="The certificate's private key.")
@click.option(
    "--webhook-url",
    metavar="URL",
    help="Send signed financial_connections.account.disconnected events here "
    "(secret: env STRIPE_WEBHOOK_SECRET).",
)
def sandbox(
    *,
    host: str,
    port: int,
    accounts: str | None,
    missing: str | None,
    inactive: str | None,
    rate_limits: tuple[str, ...],
    revoked_accounts: tuple[str, ...],
    tls_cert: str | None,
    tls_key: str | None,
    **knobs: Any,
) -> None:
    """A local stand-in for Stripe's disconnect, retrieve, list and events endpoints, with
    fault knobs."""
    from bulkdisconnect.sandbox import (
        SandboxConfig,
        load_account_ids,
        load_accounts,
        parse_rate_limits,
        serve,
    )
    from bulkdisconnect.serving import STOP_SIGNALS

    try:
        config = SandboxConfig(
            accounts=load_accounts(accounts) if accounts else None,
            missing=load_account_ids(missing) if missing else frozenset(),
            inactive=load_account_ids(inactive) if inactive else frozenset(),
            rate_limits=parse_rate_limits(rate_limits),
            revoked_accounts=frozenset(revoked_accounts),
            api_key=os.environ.get("SANDBOX_API_KEY") or None,
            webhook_secret=_first_webhook_secret() if knobs.get("webhook_url") else None,
            **knobs,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    tls = _server_tls(tls_cert, tls_key)

    def ready(url: str) -> None:
        click.echo(f"sandbox listening on {url}", err=False)
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        _run_async(
            lambda: serve(
                config, host=host, port=port, ready=ready, stop_signals=STOP_SIGNALS, tls=tls
            )
        )


def _server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The sandbox's TLS context from --tls-cert/--tls-key (both or neither)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"cannot load --tls-cert/--tls-key: {exc}") from None
    return context
