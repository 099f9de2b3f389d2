"""The container recipes run: images built, the compose stack up, a study in, the SR back out.

``deploy/Dockerfile`` and ``deploy/compose/compose.yaml`` with Debian's podman (as root, configured by
``deploy/containers/configure-podman.sh``) and podman-compose, both installed by ``setup.sh``. No registry is
reachable here, so the base images are made locally first (``deploy/containers/base-images.sh``: debootstrap
+ Debian's python3.11, skipped when they exist). Then: ``podman-compose build`` (docker format, so the images
keep their HEALTHCHECK), ``up -d``, every service's health check run until it passes (PostgreSQL and Redis
built from Debian's packages, Orthanc, the receiver, the ``work`` process), a phantom study sent to the
containerised Orthanc with dcmtk's storescu; Orthanc routes it to the node, a Celery worker container
analyses it, and the SR must arrive back in Orthanc's study. The stack, its volumes and its network are
removed at the end; the images stay (the next run builds from the layer cache).

Slow: the first build of the node image installs the dependencies (minutes); later runs reuse the layers.
Skips when podman or podman-compose is missing, or when not root; fails instead under CI=true.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from e2e_support import (
    DCMTK_STORESCU,
    REPO,
    Stack,
    make_phantom_study,
    node_outputs,
    retrieve,
    storescu_into_orthanc,
    under_ci,
    wait_for,
)

from dicomnode.netutil import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
BASE_IMAGES = REPO / "deploy" / "containers" / "base-images.sh"
#: The services with a health check in the compose file (the Celery worker has no port to ask).
HEALTHCHECKED = ("db", "broker", "orthanc", "receive", "work")
SERVICES = (*HEALTHCHECKED, "celery-worker")


def _require_podman() -> None:
    reason = None
    missing = [t for t in ("podman", "podman-compose", "debootstrap") if shutil.which(t) is None]
    if missing:
        reason = f"missing {', '.join(missing)} (./setup.sh installs the container tooling)"
    elif os.geteuid() != 0:
        reason = "the container recipes are tested with podman as root"
    elif not Path(DCMTK_STORESCU).exists():
        reason = f"dcmtk's storescu missing at {DCMTK_STORESCU} (./setup.sh installs dcmtk)"
    if reason is None:
        return
    if under_ci():
        pytest.fail(reason + " -- required under CI")
    pytest.skip(reason)


def _run(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> subprocess.CompletedProcess[str]:
    """Run a step; its output goes to ``log`` (appended) and the tail into the failure message."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}  ({time.monotonic() - t0:.0f} s, exit {p.returncode})\n")
        fh.write(p.stdout + p.stderr + "\n")
    assert p.returncode == 0, (
        f"{' '.join(cmd)} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    )
    return p


def _torch_wheel() -> None:
    """The CPU torch wheel the Dockerfile installs first, in .whl/ (taken from where pip finds it here)."""
    if glob.glob(str(REPO / ".whl" / "torch-2.13.0+cpu-*.whl")):
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(REPO / ".whl"),
            "torch==2.13.0",
        ],
        check=True,
        timeout=600,
    )


class ComposeStack:
    """One podman-compose project of deploy/compose/compose.yaml on free loopback ports."""

    def __init__(self, work: Path) -> None:
        self.project = f"dntest{uuid.uuid4().hex[:8]}"
        self.log = work / "compose.log"
        self.stack = Stack(state=work)  # the Orthanc ports, for the e2e helpers
        self.node_http = free_port()
        self.env = dict(
            os.environ,
            BUILDAH_FORMAT="docker",
            ORTHANC_DICOM_PORT=str(self.stack.orthanc_dicom),
            ORTHANC_HTTP_PORT=str(self.stack.orthanc_http),
            NODE_HTTP_PORT=str(self.node_http),
        )

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = ["podman-compose", "-f", str(COMPOSE), "-p", self.project, *args]
        return _run(cmd, self.env, timeout, self.log)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def healthy(self, service: str) -> bool:
        p = subprocess.run(
            ["podman", "healthcheck", "run", self.container(service)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return p.returncode == 0

    def logs(self) -> str:
        out = []
        for s in SERVICES:
            p = subprocess.run(
                ["podman", "logs", "--tail", "40", self.container(s)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            out.append(f"--- {s}\n{(p.stdout + p.stderr)[-3000:]}")
        return "\n".join(out)

    def down(self) -> None:
        subprocess.run(
            ["podman-compose", "-f", str(COMPOSE), "-p", self.project, "down", "-v"],
            env=self.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        # podman-compose 1.0 leaves the project's network behind
        subprocess.run(
            ["podman", "network", "rm", "-f", f"{self.project}_default"], capture_output=True, check=False
        )


@pytest.fixture
def compose_stack(tmp_path: Path) -> Iterator[ComposeStack]:
    _require_podman()
    stack = ComposeStack(tmp_path)
    try:
        yield stack
    finally:
        stack.down()


def test_compose_stack_returns_the_sr(compose_stack: ComposeStack, tmp_path: Path) -> None:
    steps: dict[str, float] = {}
    t = time.monotonic()
    _run(["bash", str(BASE_IMAGES)], compose_stack.env, 1200, compose_stack.log)
    _torch_wheel()
    compose_stack.compose("build", timeout=1500)
    steps["base images + build"] = time.monotonic() - t

    # The images keep their health checks (docker format) ...
    for image in ("dicomnode", "dicomnode-orthanc", "dicomnode-postgres", "dicomnode-redis"):
        p = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Config.Healthcheck}}", image],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "CMD" in p.stdout, f"{image}: no HEALTHCHECK in the image ({p.stdout.strip()})"

    t = time.monotonic()
    compose_stack.compose("up", "-d", timeout=300)
    # ... and every service with one in the compose file passes it (PostgreSQL and Redis from Debian's
    # packages, Orthanc, the receiver and the sweeps process, these two on PostgreSQL and Redis).
    try:
        for service in HEALTHCHECKED:
            check = functools.partial(compose_stack.healthy, service)
            wait_for(f"{service} healthy", check, timeout=240, interval=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{compose_stack.logs()}") from exc
    steps["stack up and healthy"] = time.monotonic() - t
    r = requests.get(f"http://127.0.0.1:{compose_stack.node_http}/api/health", timeout=10)
    assert r.ok, r.text

    t = time.monotonic()
    study = make_phantom_study(tmp_path / "study")
    storescu_into_orthanc(
        compose_stack.stack, study.folder, study.study_uid, expected=len(study.all_files), aet="MODALITY"
    )
    try:
        srs = wait_for(
            "the SR back in Orthanc's study",
            lambda: node_outputs(compose_stack.stack, study.study_uid)["SR"],
            timeout=600,
            interval=3,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{compose_stack.logs()}") from exc
    steps["study in, SR out"] = time.monotonic() - t

    sr = pydicom.dcmread(retrieve(compose_stack.stack, study.study_uid, srs[0], tmp_path / "sr.dcm"))
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == study.study_uid
    # analysed by the Celery worker container (its task ran at least one job), not by 'work' itself
    worker = subprocess.run(
        ["podman", "logs", compose_stack.container("celery-worker")],
        capture_output=True,
        text=True,
        check=True,
    )
    worker_log = worker.stdout + worker.stderr
    assert re.search(r"dicomnode\.run_next_job\[[^]]+\] succeeded in [0-9.]+s: [1-9]", worker_log), (
        worker_log[-3000:]
    )
    print("container test steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items()))
