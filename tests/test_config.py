"""Run configuration: precedence, validation messages that name their origin, and the API key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bulkdisconnect.config import (
    DEFAULT_API_BASE,
    CustomerList,
    FileInput,
    RunConfig,
    Secret,
    SqlQuery,
    build_run_config,
)
from bulkdisconnect.errors import UsageError

KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
ENV = {"STRIPE_API_KEY": KEY}


def build(
    flags: dict[str, Any] | None = None,
    job_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunConfig:
    """Build a config with an input and a key unless the test says otherwise."""
    return build_run_config(
        {"input": "ids.txt", **(flags or {})}, job_file, ENV if env is None else env
    )


def job_file(tmp_path: Path, text: str, name: str = "purge.toml") -> Path:
    """Write a TOML job file."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- precedence -------------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given() -> None:
    """With only an input and a key, every setting takes its documented default."""
    config = build()
    assert config.api_base == DEFAULT_API_BASE
    assert config.rate == 20.0
    assert config.max_attempts == 5
    assert config.dry_run is False
    assert config.retry_failed is False
    assert config.stripe_account is None
    assert config.breaker_threshold == 0.5


def test_env_overrides_default(tmp_path: Path) -> None:
    """STRIPE_API_BASE from the environment replaces the default API base."""
    config = build(env={**ENV, "STRIPE_API_BASE": "https://env.example.com"})
    assert config.api_base == "https://env.example.com"


def test_job_file_overrides_env(tmp_path: Path) -> None:
    """A job file's api_base wins over STRIPE_API_BASE."""
    path = job_file(tmp_path, 'api_base = "https://file.example.com"\nrate = 7\n')
    config = build(job_file=path, env={**ENV, "STRIPE_API_BASE": "https://env.example.com"})
    assert config.api_base == "https://file.example.com"
    assert config.rate == 7.0


def test_flag_overrides_job_file_and_env(tmp_path: Path) -> None:
    """A flag wins over both the job file and the environment."""
    path = job_file(tmp_path, 'api_base = "https://file.example.com"\nrate = 7\n')
    config = build(
        {"api_base": "https://flag.example.com", "rate": 3.0},
        job_file=path,
        env={**ENV, "STRIPE_API_BASE": "https://env.example.com"},
    )
    assert config.api_base == "https://flag.example.com"
    assert config.rate == 3.0


def test_unset_flags_do_not_override_job_file(tmp_path: Path) -> None:
    """A flag passed as None (not given on the command line) leaves the job file's value."""
    path = job_file(tmp_path, "rate = 7\ndry_run = true\n")
    config = build({"rate": None, "dry_run": None}, job_file=path)
    assert config.rate == 7.0
    assert config.dry_run is True


def test_job_file_supplies_input(tmp_path: Path) -> None:
    """The input may come from the job file alone."""
    path = job_file(tmp_path, 'input = "accounts.csv"\ncolumn = "id"\n')
    config = build_run_config({}, path, ENV)
    assert config.source == FileInput("accounts.csv", "id")


# -- job file -----------------------------------------------------------------------------------


def test_unknown_job_file_key_is_named(tmp_path: Path) -> None:
    """A misspelt key in a job file is an error that names the key and the file."""
    path = job_file(tmp_path, "rat = 7\n")
    with pytest.raises(UsageError, match="'rat'") as info:
        build(job_file=path)
    assert str(path) in str(info.value)


def test_api_key_in_job_file_is_refused(tmp_path: Path) -> None:
    """A job file may not hold the API key itself, and the refusal does not echo it."""
    path = job_file(tmp_path, f'api_key = "{KEY}"\n')
    with pytest.raises(UsageError, match="api_key") as info:
        build(job_file=path)
    assert KEY not in str(info.value)


def test_missing_job_file_is_a_usage_error(tmp_path: Path) -> None:
    """A job file path that does not exist is reported as such."""
    with pytest.raises(UsageError, match="not found"):
        build(job_file=tmp_path / "nope.toml")


def test_invalid_toml_is_a_usage_error(tmp_path: Path) -> None:
    """A job file that is not TOML is reported with its path."""
    path = job_file(tmp_path, "rate = = 7\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        build(job_file=path)


# -- values name their origin -----------------------------------------------------------------


def test_bad_flag_names_the_flag() -> None:
    """A bad flag value is reported under the flag's spelling."""
    with pytest.raises(UsageError, match=r"^--rate must be > 0"):
        build({"rate": 0.0})


def test_bad_job_file_value_names_key_and_file(tmp_path: Path) -> None:
    """A bad job-file value is reported as '<key> in <path>'."""
    path = job_file(tmp_path, "rate = -1\n")
    with pytest.raises(UsageError) as info:
        build(job_file=path)
    assert str(info.value).startswith(f"rate in {path} must be > 0")


def test_bad_env_value_names_the_variable() -> None:
    """A plain-http STRIPE_API_BASE to a remote host names the variable and asks for https."""
    with pytest.raises(UsageError, match=r"^STRIPE_API_BASE must use https"):
        build(env={**ENV, "STRIPE_API_BASE": "http://api.stripe.com"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_attempts": 2.5}, "--max-attempts must be a whole number"),
        ({"max_attempts": 0}, "--max-attempts must be > 0"),
        ({"concurrency": -3}, "--concurrency must be > 0"),
        ({"timeout": float("inf")}, "--timeout must be a finite number"),
        ({"rate": float("nan")}, "--rate must be a finite number"),
        ({"rate": "fast"}, "--rate must be a number"),
        ({"rate": True}, "--rate must be a number"),
        ({"grace": -1.0}, "--grace must be >= 0"),
        ({"breaker_threshold": 1.5}, "--breaker-threshold must be in (0, 1]"),
        ({"breaker_threshold": 0}, "--breaker-threshold must be in (0, 1]"),
        ({"dry_run": "yes"}, "--dry-run must be true or false"),
        ({"stripe_account": "acct_1/../x"}, "--stripe-account must be a Stripe account ID"),
        ({"api_base": "ftp://example.com"}, "--api-base must be an http(s) URL"),
        ({"api_base": "https://"}, "--api-base must be an http(s) URL"),
        ({"column": "  "}, "--column must be a non-empty string"),
    ],
)
def test_bad_values_are_refused_with_their_origin(flags: dict[str, Any], message: str) -> None:
    """Each kind of bad value is refused with a message that starts with its origin."""
    with pytest.raises(UsageError) as info:
        build(flags)
    assert str(info.value).startswith(message)


def test_huge_integer_in_job_file_is_a_usage_error(tmp_path: Path) -> None:
    """An integer too large for a float is a UsageError naming its origin, not a crash."""
    path = job_file(tmp_path, f"max_attempts = {'9' * 400}\n")
    with pytest.raises(UsageError) as info:
        build(job_file=path)
    assert str(info.value).startswith(f"max_attempts in {path}")


# -- api_base ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:12111",
        "http://localhost:8080",
        "http://[::1]:9000",
        "http://127.0.0.2",
    ],
)
def test_http_allowed_to_loopback(url: str) -> None:
    """Plain http is accepted only for a loopback host (the local sandbox)."""
    assert build({"api_base": url + "/"}).api_base == url


@pytest.mark.parametrize(
    "url",
    [
        "http://api.stripe.com",
        "http://10.0.0.1",
        "http://localhost.evil.example",
        "http://127.0.0.1@evil.example",
        "http://[::2]",
    ],
)
def test_http_refused_to_other_hosts(url: str) -> None:
    """Plain http to any non-loopback host is refused: the key would cross the network in clear."""
    with pytest.raises(UsageError, match="must use https"):
        build({"api_base": url})


# -- job name and state -----------------------------------------------------------------------


def test_job_name_from_job_file_stem(tmp_path: Path) -> None:
    """Without --job, the job is named after the job file."""
    path = job_file(tmp_path, 'input = "ids.csv"\n', name="march-purge.toml")
    config = build_run_config({}, path, ENV)
    assert config.job == "march-purge"
    assert config.state == Path("state") / "march-purge.sqlite"


@pytest.mark.parametrize(
    ("input_path", "job"),
    [
        ("ids.csv.gz", "ids"),
        ("data/ids.txt", "ids"),
        ("accounts.jsonl", "accounts"),
        ("plain", "plain"),
    ],
)
def test_job_name_from_input_stem(input_path: str, job: str) -> None:
    """Without --job or a job file, the job is named after the input file, minus .gz."""
    assert build({"input": input_path}).job == job


def test_job_flag_wins_over_derived_name(tmp_path: Path) -> None:
    """--job names the job even when a job file is given."""
    path = job_file(tmp_path, 'input = "ids.csv"\n')
    assert build_run_config({"job": "explicit"}, path, ENV).job == "explicit"


def test_stdin_without_job_is_an_error() -> None:
    """Reading stdin needs an explicit --job: there is no file name to derive it from."""
    with pytest.raises(UsageError, match="--job is required"):
        build({"input": "-"})


def test_stdin_with_job_is_accepted() -> None:
    """Reading stdin with --job works."""
    assert build({"input": "-", "job": "piped"}).job == "piped"


def test_missing_input_is_an_error() -> None:
    """Without any source the config is refused."""
    with pytest.raises(UsageError, match="no source"):
        build_run_config({"job": "x"}, None, ENV)


def test_missing_input_without_job_says_input_is_missing() -> None:
    """With neither input nor --job, the error asks for a source, not for a job name."""
    with pytest.raises(UsageError, match="no source"):
        build_run_config({}, None, ENV)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"input": "a.txt", "db": "sqlite:///x.db", "query": "SELECT 1"}, "one source"),
        ({"input": "a.txt", "customer": ("cus_1",)}, "one source"),
        ({"db": "sqlite:///x.db", "job": "j"}, "both --db"),
        ({"query": "SELECT 1", "job": "j"}, "both --db"),
        ({"input": "a.txt", "params": ("a=1",)}, "--param goes with --query"),
        ({"db": "sqlite:///x.db", "query": "SELECT 1"}, "--job is required"),
        ({"customer": ("bad",), "job": "j"}, "cus_"),
        ({"db": "sqlite:///x.db", "query": "q", "params": ("novalue",), "job": "j"}, "name=value"),
    ],
)
def test_sources_are_exclusive_and_complete(flags: dict[str, object], message: str) -> None:
    """Exactly one complete source is accepted; anything else names the problem."""
    with pytest.raises(UsageError, match=message):
        build_run_config(flags, None, ENV)


def test_sql_and_customer_sources_from_a_job_file(tmp_path: Path) -> None:
    """A job file can hold a SQL source with a params table, or a customers list."""
    sql = tmp_path / "purge.toml"
    sql.write_text(
        'db = "sqlite:///x.db"\nquery = "SELECT id FROM t WHERE d < :cutoff"\n'
        "[params]\ncutoff = 90\n"
    )
    config = build_run_config({}, sql, ENV)
    assert config.job == "purge"
    assert config.source == SqlQuery(
        "sqlite:///x.db", "SELECT id FROM t WHERE d < :cutoff", {"cutoff": "90"}, None
    )
    offboarding = tmp_path / "off.toml"
    offboarding.write_text('customer = ["cus_a", "cus_b"]\n')
    config = build_run_config({}, offboarding, ENV)
    assert config.source == CustomerList(("cus_a", "cus_b"), None)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "a b", "x" * 101, "\u00e4"])
def test_hostile_job_names_are_refused(name: str) -> None:
    """Job names that could escape the state folder or are not plain are refused."""
    with pytest.raises(UsageError, match="--job must be"):
        build({"job": name})


def test_hostile_derived_job_name_is_refused() -> None:
    """A job name derived from an odd input file name is validated too."""
    with pytest.raises(UsageError, match="job name derived from"):
        build({"input": "my ids.txt"})


def test_default_state_path() -> None:
    """The store defaults to state/<job>.sqlite; --state overrides it."""
    assert build({"job": "j"}).state == Path("state/j.sqlite")
    assert build({"job": "j", "state": "elsewhere/x.db"}).state == Path("elsewhere/x.db")


def test_state_may_be_a_sqlite_url_or_a_postgresql_url() -> None:
    """sqlite:/// names a file; a PostgreSQL URL is kept whole for the shared store."""
    assert build({"job": "j", "state": "sqlite:///s/x.db"}).state == Path("s/x.db")
    url = "postgresql://bd@db.internal:5432/ops?schema=purges"
    assert build({"job": "j", "state": url}).state == url


def test_join_needs_a_postgresql_store(tmp_path: Path) -> None:
    """--join (or join in a job file) with a SQLite store is refused, naming where it came from."""
    with pytest.raises(UsageError, match=r"^--join needs .*postgresql://"):
        build({"job": "j", "join": True})
    path = job_file(tmp_path, "join = true\n")
    with pytest.raises(UsageError, match=r"join in .*purge.toml.*postgresql://"):
        build(job_file=path)
    url = "postgresql://bd@db.internal/ops"
    assert build({"job": "j", "join": True, "state": url}).join


def test_source_fingerprint_follows_the_source_arguments_only() -> None:
    """Workers agree on the fingerprint when their source arguments agree, whatever the rest."""
    base = build({"job": "j"}).source_fingerprint
    assert build({"job": "j", "rate": 5.0, "concurrency": 3}).source_fingerprint == base
    assert build({"job": "j", "input": "other.txt"}).source_fingerprint != base
    assert build({"job": "j", "retry_failed": True}).source_fingerprint != base


def test_concurrency_adapts_unless_given() -> None:
    """Without --concurrency the in-flight cap is left to adapt (None)."""
    assert build({"rate": 100.0}).concurrency is None


def test_explicit_concurrency_wins() -> None:
    """--concurrency fixes the in-flight cap."""
    assert build({"rate": 1000.0, "concurrency": 7}).concurrency == 7


# -- API key ----------------------------------------------------------------------------------


def test_key_from_env() -> None:
    """STRIPE_API_KEY supplies the key."""
    config = build()
    assert config.api_key is not None
    assert config.api_key.reveal() == KEY
    assert not config.is_live


def test_key_from_file_strips_trailing_newline(tmp_path: Path) -> None:
    """api_key_file is read and its trailing newline stripped; it wins over the environment."""
    key_path = tmp_path / "key"
    key_path.write_text("rk_live_abc123\n", encoding="utf-8")
    key_path.chmod(0o640)  # group-readable, as Kubernetes mounts a Secret for an fsGroup
    path = job_file(tmp_path, f'api_key_file = "{key_path}"\n')
    config = build(job_file=path, env={"STRIPE_API_KEY": KEY})
    assert config.api_key is not None
    assert config.api_key.reveal() == "rk_live_abc123"
    assert config.is_live


def test_a_key_file_any_user_may_read_is_refused(tmp_path: Path) -> None:
    """The world bit on the key file: exit 2, saying how to fix it; the key is not echoed."""
    key_path = tmp_path / "key"
    key_path.write_text("rk_live_abc123\n", encoding="utf-8")
    key_path.chmod(0o644)
    with pytest.raises(UsageError, match=r"^api_key_file in .* is readable by any user") as info:
        build(job_file=job_file(tmp_path, f'api_key_file = "{key_path}"\n'))
    assert "chmod 600" in str(info.value)
    assert "defaultMode: 0440" in str(info.value)
    assert "rk_live_abc123" not in str(info.value)


def test_unreadable_key_file_names_it(tmp_path: Path) -> None:
    """A key file that cannot be read is reported under its origin."""
    path = job_file(tmp_path, f'api_key_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(UsageError, match=r"^api_key_file in .* cannot be read") as info:
        build(job_file=path)
    assert f"({tmp_path / 'missing'}: No such file or directory)" in str(info.value)


@pytest.mark.parametrize("env", [{}, {"STRIPE_API_KEY": ""}])
def test_missing_key_is_an_error(env: dict[str, str]) -> None:
    """Without a key the run is refused with a message saying how to give one."""
    with pytest.raises(UsageError, match="STRIPE_API_KEY"):
        build(env=env)


@pytest.mark.parametrize(
    "key",
    [
        "sk_test_Zq9/Xk7",
        "pk_test_Zq9Xk7",
        "sk_prod_Zq9Xk7",
        "sk_live_Zq9 Xk7",
        "whsec_Zq9Xk7",
        "Bearer sk_test_Zq9Xk7",
    ],
)
def test_malformed_key_error_never_echoes_the_key(key: str, tmp_path: Path) -> None:
    """A malformed key is refused, and no part of its text appears in the message."""
    with pytest.raises(UsageError) as from_env:
        build(env={"STRIPE_API_KEY": key})
    key_path = tmp_path / "key"
    key_path.write_text(key + "\n", encoding="utf-8")
    key_path.chmod(0o600)
    with pytest.raises(UsageError) as from_file:
        build(job_file=job_file(tmp_path, f'api_key_file = "{key_path}"\n'))
    for info in (from_env, from_file):
        message = str(info.value)
        assert "does not look like a Stripe secret" in message
        assert key not in message
        assert "Zq9" not in message


def test_dry_run_needs_no_key() -> None:
    """A dry run plans only, so it needs no API key."""
    config = build({"dry_run": True}, env={})
    assert config.api_key is None
    assert not config.is_live


def test_secret_never_shows_its_value() -> None:
    """A Secret's repr and str hide the value, including inside a config's repr."""
    secret = Secret(KEY)
    assert KEY not in repr(secret)
    assert KEY not in str(secret)
    assert KEY not in f"{secret}"
    assert KEY not in repr(build())
    assert secret.reveal() == KEY


@pytest.mark.parametrize("job_file", sorted(Path(__file__).parent.parent.glob("jobs/*.toml")))
def test_shipped_job_files_are_valid(job_file: Path) -> None:
    """Every example job in jobs/ passes validation (no unknown key, sane values)."""
    config = build_run_config({}, job_file, ENV)
    assert config.job == job_file.stem


def test_a_malformed_proxy_url_is_refused_without_its_password() -> None:
    with pytest.raises(UsageError, match=r"^--proxy must be an http\(s\) URL") as info:
        build(flags={"proxy": "socks5://bd:hunter2@proxy.internal:1080"})
    assert "hunter2" not in str(info.value)
