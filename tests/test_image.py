"""The image the Dockerfile builds and the manifests that run it agree with each other.

No container engine runs in the tests: they read the Dockerfile, .dockerignore and the
manifests, and build the wheel from exactly what the build context would hold.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "jobs" / "k8s").glob("*.yaml"))
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages[1:]  # stages[0]: the global ARGs before the first FROM


def _last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for key, rest in stage if key == keyword]
    assert values, f"the final stage has no {keyword}"
    return values[-1]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    """The final stage's ENV, in the KEY=value form."""
    pairs = [p.split("=", 1) for key, rest in stage if key == "ENV" for p in rest.split()]
    return {name: value.strip('"') for name, value in pairs}


def _pods() -> list[tuple[str, dict[str, Any]]]:
    """(manifest name, pod spec) of every Job and CronJob under jobs/k8s/."""
    pods = []
    for manifest in MANIFESTS:
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc["kind"] == "CronJob":
                pods.append((manifest.name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
            elif doc and doc["kind"] == "Job":
                pods.append((manifest.name, doc["spec"]["template"]["spec"]))
    assert len(pods) == len(MANIFESTS)
    return pods


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"{quantity}: write memory in Mi or Gi"
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def test_the_manifests_run_the_image_make_builds_at_the_projects_version() -> None:
    """Every container's image is `make image`'s name, tagged with pyproject's version,
    which is also the version the Dockerfile builds and labels by default."""
    made = subprocess.run(
        ["make", "--no-print-directory", "-s", "image-name"],  # noqa: S607
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert made.endswith(f":{VERSION}")
    for name, pod in _pods():
        for container in pod["containers"]:
            assert container["image"] == made, name
    for stage in _stages():
        assert ("ARG", f"VERSION={VERSION}") in stage
    labels = " ".join(rest for key, rest in _stages()[-1] if key == "LABEL")
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels


def test_the_image_runs_the_cli_as_the_user_the_manifests_expect() -> None:
    """The image's entrypoint is the CLI and its user is the fixed non-root UID that every pod
    runs as, with the same group owning its volumes."""
    final = _stages()[-1]
    assert json.loads(_last(final, "ENTRYPOINT")) == ["bulkdisconnect"]
    uid, gid = _last(final, "USER").split(":")
    assert int(uid) != 0
    for name, pod in _pods():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid)), name
        assert context["fsGroup"] == int(gid), name


def test_every_container_is_locked_down() -> None:
    """Each container has a read-only root, no privilege escalation, no capability, the
    RuntimeDefault seccomp profile and no service-account token."""
    for name, pod in _pods():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name


def test_the_only_writable_places_are_volumes_where_the_image_writes() -> None:
    """TMPDIR is a writable emptyDir in every pod, the working folder is the image's volume, and
    a pod keeping SQLite state mounts its volume there."""
    final = _stages()[-1]
    env = _env(final)
    workdir = _last(final, "WORKDIR")
    assert env["HOME"] == workdir
    assert json.loads(_last(final, "VOLUME")) == [workdir]
    for name, pod in _pods():
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        tmp = mounts[env["TMPDIR"]]
        assert not tmp.get("readOnly", False), name
        assert "emptyDir" in volumes[tmp["name"]], name
        state = [m for m in mounts.values() if "persistentVolumeClaim" in volumes[m["name"]]]
        assert [m["mountPath"] for m in state] in ([], [workdir]), name


def test_memory_requests_cover_the_measured_peak_with_room() -> None:
    """Each container requests at least the peak RSS benchmarks/RESULTS.md measured for a
    1,000,000-ID real run, and its limit leaves at least twice that."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    found = re.search(r"^\| real run .*?\| [\d.]+ MB \| ([\d.]+) MB \|", results, re.MULTILINE)
    assert found, "RESULTS.md has no '4. Memory' row for the real run: update this test"
    peak_mib = float(found[1]) * 1e6 / 2**20
    for name, pod in _pods():
        for container in pod["containers"]:
            resources = container["resources"]
            assert _mebibytes(resources["requests"]["memory"]) >= peak_mib, name
            assert _mebibytes(resources["limits"]["memory"]) >= 2 * peak_mib, name


# .dockerignore's wildcards as regular expressions (Go's filepath.Match, plus `**`).
WILDCARDS = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out (Docker's rules: the last pattern matching it or
    one of its parent folders decides; `!` brings back; `*` stays within a folder)."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = "".join(
            WILDCARDS.get(piece) or re.escape(piece)
            for piece in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", body)
        )
        prefixes = ("/".join(parts[: n + 1]) for n in range(len(parts)))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.mark.slow
def test_the_build_context_builds_the_wheel_the_image_installs(tmp_path: Path) -> None:
    """What the build stage copies from the context (after .dockerignore) builds, with the
    project's build backend, the wheel the Dockerfile installs, SQL and type marker included."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = tmp_path / "context"
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and not _ignored(relative, patterns):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / relative)
    assert not any(_ignored(p, patterns) for p in ("pyproject.toml", "bulkdisconnect/cli.py"))
    assert all(_ignored(p, patterns) for p in (".venv/bin/python", "state/j.sqlite", ".git/HEAD"))

    build, _final = _stages()
    workdir = Path(_last(build, "WORKDIR"))
    stage = tmp_path / "stage"
    for sources in (rest.split() for key, rest in build if key == "COPY"):
        *copied, target = sources
        for source in copied:
            destination = stage / (workdir / target).relative_to("/")
            if (context / source).is_dir():  # Docker copies a folder's contents
                shutil.copytree(context / source, destination, dirs_exist_ok=True)
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / source, destination)
    built = stage / (workdir.relative_to("/"))
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=built,
        check=True,
    )
    wheel = wheels / f"bulkdisconnect-{VERSION}-py3-none-any.whl"  # the name the RUN installs
    names = zipfile.ZipFile(wheel).namelist()
    assert "bulkdisconnect/store/queries.sql" in names
    assert "bulkdisconnect/py.typed" in names
    assert not [name for name in names if "__pycache__" in name]
