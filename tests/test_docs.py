"""What the docs and manifests promise about exit codes agrees with `ExitCode`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from bulkdisconnect.cli import main
from bulkdisconnect.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "jobs" / "k8s").glob("*.yaml"))
# What a scheduler must do with each failing exit code: fail at once (a fix is needed), or
# try again (the run resumes). 1 and 4 may end the Job or one index, as each manifest says.
MUST_FAIL = {ExitCode.USAGE, ExitCode.REFUSED}
MUST_RETRY = {ExitCode.INTERRUPTED, ExitCode.STORE_FAILED}


def test_the_readme_table_has_one_row_per_exit_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| ", readme, flags=re.MULTILINE)
    assert [int(code) for code in rows] == [int(code) for code in ExitCode]


def test_run_help_lists_every_exit_code() -> None:
    text = CliRunner().invoke(main, ["run", "--help"]).stdout
    listed = re.findall(r"^\s+(\d+)\s{2}\S", text.split("Exit codes:")[1], flags=re.MULTILINE)
    assert [int(code) for code in listed] == [int(code) for code in ExitCode]


def _decisions(manifest: Path) -> dict[int, str]:
    """Exit code -> the podFailurePolicy action that handles it."""
    documents = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
    (job,) = [doc for doc in documents if doc["kind"] in ("Job", "CronJob")]
    spec: dict[str, Any] = job["spec"]
    if job["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    decisions: dict[int, str] = {}
    for rule in spec["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes", {})
        assert codes.get("operator", "In") == "In"
        for code in codes.get("values", []):
            assert code not in decisions, f"{manifest.name}: exit {code} in two rules"
            decisions[code] = rule["action"]
    return decisions


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_each_manifest_decides_every_failing_exit_code(manifest: Path) -> None:
    decisions = _decisions(manifest)
    failing = {int(code) for code in ExitCode if code is not ExitCode.OK}
    assert set(decisions) == failing
    assert all(decisions[code] == "FailJob" for code in MUST_FAIL)
    assert all(decisions[code] == "Count" for code in MUST_RETRY)
