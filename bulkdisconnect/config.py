"""Run configuration: job file, environment and flags merged once, validated once.

Precedence is flag > job file > environment > default. Each value remembers where it came from,
so an error can say "rate in jobs/purge.toml must be > 0" or "--rate must be > 0".
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulkdisconnect.errors import UsageError
from bulkdisconnect.model import CUSTOMER_ID_PATTERN
from bulkdisconnect.store import is_shared_location

DEFAULT_API_BASE = "https://api.stripe.com"
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
API_KEY = re.compile(r"(sk|rk)_(test|live)_[A-Za-z0-9]+")
STRIPE_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]+")


class Secret:
    """A value that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class FileInput:
    """Account IDs from a file (.txt, .csv, .jsonl, maybe .gz) or stdin (`-`)."""

    path: str
    column: str | None  # the CSV column or JSONL field; None: account_id, or the only one
    account_column: str | None = None  # each row's connected account; None: stripe_account


@dataclass(frozen=True)
class SqlQuery:
    """Account IDs from a read-only query over SQLite or PostgreSQL."""

    db: str
    query: str
    params: dict[str, str]
    column: str | None  # None: the column named account_id, or the only one
    account_column: str | None = None  # each row's connected account; None: stripe_account


@dataclass(frozen=True)
class CustomerList:
    """The accounts of account holders, listed through the API: Stripe customers, and
    connected accounts being offboarded (`account_holder[account]`)."""

    ids: tuple[str, ...]  # customers given one by one
    file: str | None  # and/or a file of them: one a line, or a CSV naming their stripe_account
    holders: tuple[str, ...] = ()  # connected accounts given one by one (acct_...)
    holders_file: str | None = None  # and/or a file of them, one a line


SourceConfig = FileInput | SqlQuery | CustomerList


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one `run` needs, validated, in final units (defaults: `FIELDS`)."""

    job: str
    source: SourceConfig
    state: Path | str  # a SQLite file, or a PostgreSQL URL (which `join` needs)
    join: bool  # work the job together with other `run --join` workers
    api_base: str
    api_key: Secret | None
    stripe_account: str | None
    stripe_version: str | None  # None: the version the client is pinned to
    proxy: str | None  # None: HTTPS_PROXY / HTTP_PROXY / NO_PROXY decide
    ca_bundle: str | None  # None: the system's CAs (SSL_CERT_FILE honoured)
    rate: float  # per Stripe account (connected accounts each have their own budget)
    total_rate: float | None  # across all of them; None: no cap but the sum of theirs
    concurrency: int | None  # None: adapts to the observed latency
    max_attempts: int
    dry_run: bool
    retry_failed: bool
    timeout: float
    connect_timeout: float
    grace: float
    retry_delay: float
    retry_max_delay: float
    breaker_min_sample: int
    breaker_threshold: float
    lock_stale_after: float
    metrics_file: str | None
    pushgateway: str | None
    yes: bool  # confirms a run with a live key without asking
    max_accounts: int | None  # refuse to start when more accounts than this are to call
    reconcile: bool  # read the job's disconnected events from Stripe after the last disconnect
    reconcile_wait: float  # seconds to keep reading while events of the run are still missing

    @property
    def reads_stdin(self) -> bool:
        """Whether the account IDs come from standard input."""
        return isinstance(self.source, FileInput) and self.source.path == "-"

    @property
    def source_fingerprint(self) -> str:
        """A digest of the arguments that pick the accounts: workers joining a job must agree."""
        from bulkdisconnect.logs import mask_url

        source = self.source
        if isinstance(source, SqlQuery):  # no digest of a password in the store
            source = dataclasses.replace(source, db=mask_url(source.db))
        parts = (repr(source), self.retry_failed)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    @property
    def is_live(self) -> bool:
        """Whether the key is a live-mode key."""
        return self.api_key is not None and "_live_" in self.api_key.reveal()


@dataclass(frozen=True, slots=True)
class _Value:
    value: Any
    origin: str  # "--rate", "rate in jobs/x.toml", "STRIPE_API_BASE"

    @property
    def from_flag(self) -> bool:
        """Whether the command line gave this value."""
        return self.origin.startswith("--")

    def fail(self, problem: str) -> UsageError:
        return UsageError(f"{self.origin} {problem}")


def _number(v: _Value) -> float:
    if isinstance(v.value, bool) or not isinstance(v.value, int | float | str):
        raise v.fail(f"must be a number, got {v.value!r}")
    try:
        number = float(v.value)
    except (ValueError, OverflowError):
        raise v.fail(f"must be a number, got {v.value!r}") from None
    if not math.isfinite(number):
        raise v.fail(f"must be a finite number, got {v.value!r}")
    return number


def _positive(v: _Value) -> float:
    number = _number(v)
    if number <= 0:
        raise v.fail(f"must be > 0, got {v.value!r}")
    return number


# The shortest lease a run accepts: a heartbeat must get through within half of it on a busy
# machine, while a plan merges a large input and the store takes the results.
MIN_LEASE = 2.0


def _lease(v: _Value) -> float:
    number = _number(v)
    if number < MIN_LEASE:
        raise v.fail(f"must be at least {MIN_LEASE:g} seconds, got {v.value!r}")
    return number


def _non_negative(v: _Value) -> float:
    number = _number(v)
    if number < 0:
        raise v.fail(f"must be >= 0, got {v.value!r}")
    return number


def _positive_int(v: _Value) -> int:
    number = _positive(v)
    if number != int(number):
        raise v.fail(f"must be a whole number, got {v.value!r}")
    return int(number)


def _fraction(v: _Value) -> float:
    number = _number(v)
    if not 0 < number <= 1:
        raise v.fail(f"must be in (0, 1], got {v.value!r}")
    return number


def _bool(v: _Value) -> bool:
    if not isinstance(v.value, bool):
        raise v.fail(f"must be true or false, got {v.value!r}")
    return v.value


def _text(v: _Value) -> str:
    if not isinstance(v.value, str) or not v.value.strip():
        raise v.fail(f"must be a non-empty string, got {v.value!r}")
    return v.value.strip()


def _job_name(v: _Value) -> str:
    name = _text(v)
    if not JOB_NAME.fullmatch(name):
        raise v.fail(f"must be letters, digits, '.', '_' or '-' (at most 100), got {name!r}")
    return name


def _stripe_account(v: _Value) -> str:
    account = _text(v)
    if not STRIPE_ACCOUNT.fullmatch(account):
        raise v.fail(f"must be a Stripe account ID (acct_...), got {account!r}")
    return account


def _api_base(v: _Value) -> str:
    url = _text(v).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise v.fail(f"must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise v.fail(f"must use https (plain http is allowed only to a loopback host), got {url!r}")
    return url


def _ca_bundle(v: _Value) -> str:
    path = _text(v)
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError too
        reason = exc.strerror or str(exc)
        raise v.fail(f"is not a readable PEM file of CA certificates ({path}: {reason})") from None
    return path


def _params(v: _Value) -> dict[str, str]:
    """Query parameters: a TOML table, or name=value strings from repeated --param flags."""
    value = v.value
    if isinstance(value, list | tuple):
        pairs = {}
        for item in value:
            name, sep, text = str(item).partition("=")
            if not sep or not name.strip():
                raise v.fail(f"must be name=value, got {item!r}")
            pairs[name.strip()] = text
        return pairs
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if not all(isinstance(x, str | int | float) for x in value.values()):
            raise v.fail("values must be strings or numbers")
        return {k: str(x) for k, x in value.items()}
    raise v.fail(f"must be a table of name = value, got {value!r}")


def _id_list(pattern: re.Pattern[str], what: str) -> Callable[[_Value], tuple[str, ...]]:
    """A parser of one ID or a list of them, each matching `pattern`."""

    def parse(v: _Value) -> tuple[str, ...]:
        items = [v.value] if isinstance(v.value, str) else v.value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise v.fail(f"must be {what}, got {v.value!r}")
        for item in items:
            if not pattern.fullmatch(item.strip()):
                raise v.fail(f"must be {what}, got {item!r}")
        return tuple(i.strip() for i in items)

    return parse


def _url(v: _Value) -> str:
    """An http(s) URL (a proxy's, a Pushgateway's); a password in it is never echoed."""
    from bulkdisconnect.logs import mask_url

    url = _text(v)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise v.fail(f"must be an http(s) URL, got {mask_url(url)!r}")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# name -> (parser, default). Also the set of keys a job file may hold (plus `api_key_file`).
FIELDS: dict[str, tuple[Callable[[_Value], Any], Any]] = {
    "input": (_text, None),
    "db": (_text, None),
    "query": (_text, None),
    "params": (_params, {}),
    "customer": (_id_list(CUSTOMER_ID_PATTERN, "Stripe customer IDs (cus_...)"), ()),
    "customers": (_text, None),
    "holder_account": (_id_list(STRIPE_ACCOUNT, "Stripe account IDs (acct_...)"), ()),
    "holder_accounts": (_text, None),
    "column": (_text, None),
    "account_column": (_text, None),
    "job": (_job_name, None),
    "state": (_text, None),
    "join": (_bool, False),
    "api_base": (_api_base, DEFAULT_API_BASE),
    "stripe_account": (_stripe_account, None),
    "stripe_version": (_text, None),
    "proxy": (_url, None),
    "ca_bundle": (_ca_bundle, None),
    "rate": (_positive, 20.0),
    "total_rate": (_positive, None),
    "concurrency": (_positive_int, None),
    "max_attempts": (_positive_int, 5),
    "dry_run": (_bool, False),
    "retry_failed": (_bool, False),
    "timeout": (_positive, 30.0),
    "connect_timeout": (_positive, 10.0),
    "grace": (_non_negative, 10.0),
    "retry_delay": (_non_negative, 0.5),
    "retry_max_delay": (_non_negative, 20.0),
    "breaker_min_sample": (_positive_int, 100),
    "breaker_threshold": (_fraction, 0.5),
    "lock_stale_after": (_lease, 30.0),
    "metrics_file": (_text, None),
    "pushgateway": (_url, None),
    "yes": (_bool, False),
    "max_accounts": (_positive_int, None),
    "reconcile": (_bool, False),
    "reconcile_wait": (_non_negative, 30.0),
}
JOB_FILE_ONLY = {"api_key_file": _text}


def read_job_file(path: Path) -> dict[str, _Value]:
    """Parse a TOML job file into values tagged with their origin; unknown keys are errors."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read job file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"job file {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        if key == "api_key":
            raise UsageError(
                f"api_key in {path}: keys are never read from job files; "
                "use STRIPE_API_KEY or api_key_file"
            )
        if key not in FIELDS and key not in JOB_FILE_ONLY:
            raise UsageError(f"unknown key {key!r} in {path}")
        values[key] = _Value(value, f"{key} in {path}")
    return values


def build_run_config(
    flags: Mapping[str, Any], job_file: Path | None, env: Mapping[str, str]
) -> RunConfig:
    """Merge defaults < environment < job file < flags, and validate every value once."""
    raw: dict[str, _Value] = {}
    if "STRIPE_API_BASE" in env:
        raw["api_base"] = _Value(env["STRIPE_API_BASE"], "STRIPE_API_BASE")
    if job_file is not None:
        raw.update(read_job_file(job_file))
    for name, value in flags.items():
        if value is not None and value != ():  # repeatable flags give () when absent
            raw[name] = _Value(value, f"--{name.replace('_', '-')}")
    _drop_job_file_column(raw)

    parsed: dict[str, Any] = {}
    for name, (parse, default) in FIELDS.items():
        parsed[name] = parse(raw[name]) if name in raw else default

    source = _source(parsed)
    job = parsed["job"] or _default_job_name(job_file, source)
    # A dry run calls nothing, except the list calls a customers or holders source needs.
    needs_key = not parsed["dry_run"] or isinstance(source, CustomerList)
    api_key = _api_key(raw.get("api_key_file"), env) if needs_key else None
    state = resolve_state(job, parsed["state"])
    if parsed["join"] and not is_shared_location(state):
        raise raw["join"].fail(
            "needs a store the workers share: --state postgresql://... "
            "(several processes cannot share a SQLite file)"
        )
    settings = {name: parsed[name] for name in FIELDS if name not in _NOT_SETTINGS}
    return RunConfig(**settings, job=job, source=source, state=state, api_key=api_key)


# The FIELDS that become RunConfig's `source`, `job` and `state` rather than its own.
_NOT_SETTINGS = (
    "input",
    "db",
    "query",
    "params",
    "customer",
    "customers",
    "holder_account",
    "holder_accounts",
    "column",
    "account_column",
    "job",
    "state",
)


def _source(parsed: dict[str, Any]) -> SourceConfig:
    """The one source the values give, as its kind."""
    _check_one_source(parsed)
    account_column = parsed["account_column"]
    if parsed["input"] is not None:
        return FileInput(parsed["input"], parsed["column"], account_column)
    if parsed["query"] is not None:
        db, query, params, column = (parsed[k] for k in ("db", "query", "params", "column"))
        return SqlQuery(db, query, params, column, account_column)
    if account_column is not None:
        raise UsageError("--account-column goes with --input or --query")
    return CustomerList(
        parsed["customer"], parsed["customers"], parsed["holder_account"], parsed["holder_accounts"]
    )


def _drop_job_file_column(raw: dict[str, _Value]) -> None:
    """A job file's `column` is for its own input: an --input without columns (.txt, stdin)
    given on the command line overrides both. A --column flag there stays an error."""
    from bulkdisconnect.sources.files import takes_column

    column, input_ = raw.get("column"), raw.get("input")
    if column is None or input_ is None or column.from_flag or not input_.from_flag:
        return
    if not isinstance(input_.value, str) or not takes_column(input_.value):
        del raw["column"]


def _check_one_source(parsed: dict[str, Any]) -> None:
    customers = bool(parsed["customer"]) or parsed["customers"] is not None
    holders = bool(parsed["holder_account"]) or parsed["holder_accounts"] is not None
    # Customers and connected accounts may be listed together: both are Stripe lists.
    listed = " and ".join(
        name
        for name, given in (
            ("--customer/--customers", customers),
            ("--holder-account/--holder-accounts", holders),
        )
        if given
    )
    kinds = [
        name
        for name, given in (
            ("--input", parsed["input"] is not None),
            ("--db/--query", parsed["db"] is not None or parsed["query"] is not None),
            (listed, customers or holders),
        )
        if given
    ]
    if not kinds:
        raise UsageError(
            "no source: give --input PATH, --db URL with --query SQL, --customer/--customers "
            "or --holder-account/--holder-accounts"
        )
    if len(kinds) > 1:
        raise UsageError(f"give one source, not {' and '.join(kinds)}")
    if (parsed["db"] is None) != (parsed["query"] is None):
        raise UsageError("a SQL source needs both --db URL and --query SQL")
    if parsed["params"] and parsed["query"] is None:
        raise UsageError("--param goes with --query")


def default_state(job: str) -> Path:
    """Where a job's store lives unless --state says otherwise."""
    return Path("state") / f"{job}.sqlite"


def resolve_state(job: str, state: str | None) -> Path | str:
    """The store --state names: a PostgreSQL URL as is, else a SQLite file path."""
    if not state:
        return default_state(job)
    if is_shared_location(state):
        return state
    return Path(state.removeprefix("sqlite:///"))


def _default_job_name(job_file: Path | None, source: SourceConfig) -> str:
    input_path = source.path if isinstance(source, FileInput) else None
    if job_file is not None:
        stem = job_file.stem
    elif input_path is not None and input_path != "-":
        name = Path(input_path).name.removesuffix(".gz")
        stem = name.rsplit(".", 1)[0] if "." in name else name
    elif input_path == "-":
        raise UsageError("--job is required when the input is stdin")
    else:
        raise UsageError(
            "--job is required for a SQL, customers or holder-accounts source (or use a job file)"
        )
    return _job_name(_Value(stem, f"the job name derived from {job_file or input_path!r}"))


def default(name: str) -> Any:
    """The default of a setting, for the command line's help (written in FIELDS only)."""
    return FIELDS[name][1]


def _api_key(key_file: _Value | None, env: Mapping[str, str]) -> Secret:
    if key_file is not None:
        path = Path(_text(key_file))
        try:
            world_readable = path.stat().st_mode & stat.S_IROTH
            key, origin = path.read_text(encoding="utf-8").strip(), f"the key in {path}"
        except OSError as exc:
            raise key_file.fail(f"cannot be read ({path}: {exc.strerror})") from None
        if world_readable:  # group-readable is how Kubernetes mounts a Secret for an fsGroup
            raise key_file.fail(
                f"is readable by any user of this machine ({path}): `chmod 600` it, or on "
                "Kubernetes mount the Secret with defaultMode: 0440 and an fsGroup"
            )
    elif env.get("STRIPE_API_KEY"):
        key, origin = env["STRIPE_API_KEY"].strip(), "STRIPE_API_KEY"
    else:
        raise UsageError("no API key: set STRIPE_API_KEY or give --api-key-file PATH")
    if not API_KEY.fullmatch(key):
        # Never echo the value: it may be a real key with a typo.
        raise UsageError(
            f"{origin} does not look like a Stripe secret or restricted key "
            "(sk_test_..., sk_live_..., rk_test_..., rk_live_...)"
        )
    return Secret(key)


@dataclass(frozen=True, kw_only=True)
class CheckConfig:
    """What `reconcile` and `verify` need: the job and its store, how to reach Stripe, how
    fast and how patiently. The same settings as a run's, read the same way (a job file's
    source keys are ignored)."""

    job: str
    state: Path | str
    api_base: str
    api_key: Secret
    stripe_account: str | None  # the job's own rows' Stripe-Account (the run's)
    stripe_version: str | None
    proxy: str | None
    ca_bundle: str | None
    rate: float
    total_rate: float | None
    concurrency: int | None
    max_attempts: int
    timeout: float
    connect_timeout: float
    grace: float
    retry_delay: float
    retry_max_delay: float
    lock_stale_after: float
    metrics_file: str | None
    pushgateway: str | None


_CHECK_FIELDS = tuple(
    f.name for f in dataclasses.fields(CheckConfig) if f.name not in ("api_key", "state")
)


def build_check_config(
    flags: Mapping[str, Any], job_file: Path | None, env: Mapping[str, str]
) -> CheckConfig:
    """Merge defaults < environment < job file < flags for `reconcile` or `verify`."""
    raw: dict[str, _Value] = {}
    if "STRIPE_API_BASE" in env:
        raw["api_base"] = _Value(env["STRIPE_API_BASE"], "STRIPE_API_BASE")
    if job_file is not None:
        wanted = {*_CHECK_FIELDS, "state", "api_key_file"}
        raw.update((k, v) for k, v in read_job_file(job_file).items() if k in wanted)
    for name, value in flags.items():
        if value is not None and value != ():
            raw[name] = _Value(value, f"--{name.replace('_', '-')}")
    parsed = {
        name: FIELDS[name][0](raw[name]) if name in raw else FIELDS[name][1]
        for name in (*_CHECK_FIELDS, "state")
    }
    if parsed["job"] is None:
        if job_file is None:
            raise UsageError("--job is required (or give the job file)")
        parsed["job"] = _job_name(_Value(job_file.stem, f"the job name derived from {job_file}"))
    state = resolve_state(parsed["job"], parsed.pop("state"))
    return CheckConfig(**parsed, state=state, api_key=_api_key(raw.get("api_key_file"), env))
