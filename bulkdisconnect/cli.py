"""The command line: parse, build the config, call; no logic of its own."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from bulkdisconnect import __version__
from bulkdisconnect.errors import BulkDisconnectError, ExitCode, UsageError

T = TypeVar("T")


def _run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; our errors become a one-line message and their exit code."""
    from bulkdisconnect.logs import redact_text

    try:
        return anyio.run(fn)
    except BulkDisconnectError as exc:
        click.echo(f"bulkdisconnect: error: {redact_text(str(exc))}", err=True)
        sys.exit(int(exc.exit_code))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bulkdisconnect")
def main() -> None:
    """Disconnect Stripe Financial Connections accounts in bulk, resumably, within a rate limit."""


_RUN_OPTIONS = [
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
    click.option("--customers", metavar="FILE", help="Customer IDs, one a line."),
    click.option("--column", metavar="NAME", help="CSV column / JSONL field / SQL column."),
    click.option(
        "--job", metavar="NAME", help="The key a rerun resumes under [job file/input name]."
    ),
    click.option(
        "--state", metavar="PATH|URL", help="SQLite file or postgresql://… [state/<job>.sqlite]."
    ),
    click.option(
        "--join", is_flag=True, default=None, help="Work the job with other --join workers (PG)."
    ),
    click.option("--api-base", metavar="URL", help="[env STRIPE_API_BASE, else api.stripe.com]"),
    click.option("--api-key-file", metavar="PATH", help="Read the key here [env STRIPE_API_KEY]."),
    click.option("--stripe-account", metavar="ID", help="Send Stripe-Account (Connect)."),
    click.option("--stripe-version", metavar="VERSION", help="Override the pinned Stripe-Version."),
    click.option("--rate", type=float, help="Max requests per second [20]."),
    click.option("--concurrency", type=int, help="Max requests in flight [adapts to latency]."),
    click.option("--max-attempts", type=int, help="Attempts per account, first included [5]."),
    click.option("--dry-run", is_flag=True, default=None, help="Plan only: no disconnect."),
    click.option("--retry-failed", is_flag=True, default=None, help="Retry accounts that failed."),
    click.option("--yes", is_flag=True, default=None, help="Go ahead with a live key, no prompt."),
    click.option("--max-accounts", type=int, help="Refuse if more accounts than this are to call."),
    click.option("--timeout", type=float, help="Total seconds per request [30]."),
    click.option("--connect-timeout", type=float, help="Seconds to connect [10]."),
    click.option("--grace", type=float, help="Seconds in flight get after a stop signal [10]."),
    click.option("--retry-delay", type=float, help="First backoff delay in seconds [0.5]."),
    click.option("--retry-max-delay", type=float, help="Longest backoff delay in seconds [20]."),
    click.option(
        "--breaker-min-sample", type=int, help="Answers before the breaker may trip [100]."
    ),
    click.option("--breaker-threshold", type=float, help="Bad share that trips it; 1 = off [0.5]."),
    click.option("--lock-stale-after", type=float, help="Seconds without heartbeat: stale [30]."),
    click.option("--metrics-file", metavar="PATH", help="Prometheus textfile (node_exporter)."),
    click.option("--pushgateway", metavar="URL", help="Push Prometheus metrics here."),
    click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto"),
    click.option("--progress/--no-progress", default=True, help="Progress bar or log lines."),
]


def _run_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options `run` and `plan` share (the same names as the job file's keys)."""
    for option in reversed(_RUN_OPTIONS):
        command = option(command)
    return command


@main.command()
@_run_options
def run(
    job_file: Path | None, input_: str | None, log_format: str, progress: bool, **flags: Any
) -> None:
    """Disconnect every account of the source; resumes the job if it ran before."""
    _run_job(job_file, {**flags, "input": input_}, log_format=log_format, progress=progress)


@main.command()
@_run_options
def plan(
    job_file: Path | None, input_: str | None, log_format: str, progress: bool, **flags: Any
) -> None:
    """Read the whole source and print the plan (same as run --dry-run): no disconnect.

    A customers source still makes its list calls.
    """
    flags = {**flags, "input": input_, "dry_run": True}
    _run_job(job_file, flags, log_format=log_format, progress=progress)


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
        can_ask = sys.stdin.isatty() and sys.stderr.isatty() and config.input != "-"
        hooks = RunHooks(
            out=sys.stdout,
            progress=progress,
            stdin=sys.stdin.buffer,
            confirm=(lambda question: click.confirm(question, err=True)) if can_ask else None,
        )
        return await run_job(config, hooks)

    sys.exit(int(_run_async(go)))


def _state_for(job: str, state: str | None, *, must_exist: bool = True) -> Path | str:
    from bulkdisconnect.config import JOB_NAME, resolve_state

    if not JOB_NAME.fullmatch(job):
        raise UsageError(f"--job must be letters, digits, '.', '_' or '-', got {job!r}")
    location = resolve_state(job, state)
    if must_exist and isinstance(location, Path) and not location.is_file():
        raise UsageError(f"no state store at {location}: has job {job!r} ever run? (see --state)")
    return location


@main.command()
@click.option("--job", required=True, metavar="NAME")
@click.option("--state", metavar="PATH|URL", help="[state/<job>.sqlite]")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="[stdout]")
@click.option(
    "--unconfirmed", is_flag=True, help="Only disconnected accounts no webhook event confirmed."
)
def report(job: str, state: str | None, fmt: str, output: Path | None, unconfirmed: bool) -> None:
    """One row per account: outcome, attempts, HTTP status, error, request ID, times."""
    from bulkdisconnect.report import write_report
    from bulkdisconnect.store import open_store, shown_location

    async def go() -> None:
        store = await open_store(_state_for(job, state))
        try:
            if not await store.has_job(job):
                raise UsageError(f"job {job!r} is not in {shown_location(_state_for(job, state))}")
            if output is None:
                await write_report(store, job, sys.stdout, fmt, unconfirmed=unconfirmed)
                return
            tmp = output.with_name(output.name + ".partial")
            with tmp.open("w", encoding="utf-8", newline="") as out:
                rows = await write_report(store, job, out, fmt, unconfirmed=unconfirmed)
            tmp.replace(output)
            click.echo(f"wrote {rows} rows to {output}", err=True)
        finally:
            await store.aclose()

    _run_async(go)


@main.command()
@click.option("--job", required=True, metavar="NAME")
@click.option("--state", metavar="PATH|URL", help="[state/<job>.sqlite]")
def status(job: str, state: str | None) -> None:
    """Counts per outcome, the last run, and whether a run holds the job now."""
    from bulkdisconnect.report import write_status
    from bulkdisconnect.store import open_store, shown_location

    async def go() -> None:
        store = await open_store(_state_for(job, state))
        try:
            if not await store.has_job(job):
                raise UsageError(f"job {job!r} is not in {shown_location(_state_for(job, state))}")
            await write_status(store, job, sys.stdout)
        finally:
            await store.aclose()

    _run_async(go)


def _first_webhook_secret() -> str:
    from bulkdisconnect.webhook import parse_secrets

    try:
        return parse_secrets(os.environ.get("STRIPE_WEBHOOK_SECRET"))[0]
    except BulkDisconnectError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
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
    from bulkdisconnect.store import open_store
    from bulkdisconnect.webhook import WebhookReceiver, parse_secrets, serve_webhook

    logs.configure()

    def ready(url: str) -> None:
        click.echo(f"webhook listening on {url}")
        sys.stdout.flush()

    async def go() -> None:
        secrets = parse_secrets(os.environ.get("STRIPE_WEBHOOK_SECRET"))
        # The store may not exist yet: the receiver is often started before the run.
        store = await open_store(_state_for(job, state, must_exist=False))
        receiver = WebhookReceiver(store, job, secrets)
        try:
            await serve_webhook(receiver, host=host, port=port, path=path, ready=ready)
        finally:
            # What the receiver saw, including events for accounts outside the job.
            structlog.get_logger("bulkdisconnect").info(
                "bulkdisconnect.webhook.stopped", job=job, **dict(receiver.counts)
            )
            with anyio.CancelScope(shield=True):
                await store.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        _run_async(go)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=12111, show_default=True, help="0 picks a free port.")
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--jitter-ms", type=float, default=0.0, show_default=True)
@click.option("--p500", type=float, default=0.0, show_default=True, help="Share of 500 answers.")
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
@click.option("--rate-limit", type=float, default=None, help="Server-side limit, requests/s.")
@click.option(
    "--accounts", type=click.Path(exists=True, dir_okay=False), help="Only these IDs exist."
)
@click.option(
    "--missing", type=click.Path(exists=True, dir_okay=False), help="These IDs do not exist."
)
@click.option("--livemode-accounts", is_flag=True, help="Accounts live in live mode.")
@click.option("--revoke-after", type=int, default=None, help="Revoke the key after N calls.")
@click.option("--seed", type=int, default=None)
@click.option(
    "--webhook-url",
    metavar="URL",
    help="Send signed financial_connections.account.disconnected events here "
    "(secret: env STRIPE_WEBHOOK_SECRET).",
)
def sandbox(
    host: str,
    port: int,
    accounts: str | None,
    missing: str | None,
    **knobs: Any,
) -> None:
    """A local stand-in for Stripe's disconnect endpoint, with fault knobs."""
    from bulkdisconnect.sandbox import SandboxConfig, load_account_ids, serve

    config = SandboxConfig(
        accounts=load_account_ids(accounts) if accounts else None,
        missing=load_account_ids(missing) if missing else frozenset(),
        api_key=os.environ.get("SANDBOX_API_KEY") or None,
        webhook_secret=_first_webhook_secret() if knobs.get("webhook_url") else None,
        **knobs,
    )

    def ready(url: str) -> None:
        click.echo(f"sandbox listening on {url}", err=False)
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(lambda: serve(config, host=host, port=port, ready=ready))
