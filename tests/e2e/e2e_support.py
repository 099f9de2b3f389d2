"""Helpers of the end-to-end tests: the reference PACS (Orthanc, through deploy/local-stack.sh), node
processes, a phantom study, QIDO/WADO look-ups, and a slow TCP relay (to kill a worker mid-delivery).

Everything runs on loopback with free ports; every process is stopped by the test that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from dicomnode.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
#: The node's admin account in these tests (STOW-RS into the node is authenticated).
ADMIN = ("admin", "e2e-admin-password")
LOCAL_STACK = REPO / "deploy" / "local-stack.sh"
#: dcmtk's storescu by absolute path: pynetdicom installs a different `storescu` into .venv/bin, which the
#: test command puts first on PATH.
DCMTK_STORESCU = "/usr/bin/storescu"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tools(*names: str) -> None:
    """Skip (fail under CI) when a Debian tool the test needs is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = (
        f"missing tool(s): {', '.join(missing)} (apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools)"
    )
    if under_ci():
        pytest.fail(msg + " -- required under CI")
    pytest.skip(msg)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # the peer may not answer yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last_exc})" if last_exc else "")
    )


# -- the phantom study ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomStudy:
    folder: Path
    study_uid: str
    series: Mapping[str, str]  # "localizer" / "soft" / "bone" -> SeriesInstanceUID
    files: Mapping[str, tuple[Path, ...]]

    @property
    def all_files(self) -> list[Path]:
        return [p for k in ("localizer", "bone", "soft") for p in self.files[k]]


def make_phantom_study(folder: Path) -> PhantomStudy:
    """A small three-series study (localizer, thick bone kernel, 3 mm soft) from the phantom."""
    import pydicom

    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    ph = make_phantom(
        PhantomSpec(matrix=256, spacing_mm=1.3, thickness_mm=1.5, z_levels=("T11", "L5"), seed=7)
    )
    written = write_study(ph.volume, folder)
    series = {
        k: str(pydicom.dcmread(v[0], stop_before_pixels=True).SeriesInstanceUID) for k, v in written.items()
    }
    study = str(pydicom.dcmread(written["soft"][0], stop_before_pixels=True).StudyInstanceUID)
    return PhantomStudy(folder, study, series, {k: tuple(v) for k, v in written.items()})


# -- Orthanc -----------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One ``deploy/local-stack.sh`` state dir and its ports."""

    state: Path
    orthanc_http: int = field(default_factory=free_port)
    orthanc_dicom: int = field(default_factory=free_port)
    node_dicom: int = field(default_factory=free_port)
    node_http: int = field(default_factory=free_port)
    modality: int = field(default_factory=free_port)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ORTHANC_HTTP_PORT=str(self.orthanc_http),
            ORTHANC_DICOM_PORT=str(self.orthanc_dicom),
            NODE_DICOM_PORT=str(self.node_dicom),
            NODE_HTTP_PORT=str(self.node_http),
            MODALITY_PORT=str(self.modality),
            PYTHON=sys.executable,
            DICOMNODE=str(Path(sys.executable).parent / "dicomnode"),
        )
        env.update(extra)
        return env

    def up(self, **extra: str) -> None:
        proc = subprocess.run(
            ["bash", str(LOCAL_STACK), "up", str(self.state)],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"local-stack up failed:\n{proc.stdout}\n{proc.stderr}"

    def down(self) -> None:
        subprocess.run(
            ["bash", str(LOCAL_STACK), "down", str(self.state)], env=self.env(), timeout=90, check=False
        )

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.orthanc_http}"

    @property
    def dicomweb(self) -> str:
        return f"{self.orthanc_url}/dicom-web"


def qido_series(stack: Stack, study_uid: str) -> list[dict[str, Any]]:
    """QIDO-RS: the series of a study in Orthanc (empty when the study is unknown)."""
    r = requests.get(f"{stack.dicomweb}/studies/{study_uid}/series", timeout=10)
    if r.status_code in (204, 404) or not r.content:
        return []
    r.raise_for_status()
    return list(r.json())


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def series_by_modality(stack: Stack, study_uid: str, modality: str) -> list[dict[str, Any]]:
    return [s for s in qido_series(stack, study_uid) if _value(s, "00080060") == modality]


def qido_instances(stack: Stack, study_uid: str, series_uid: str) -> list[str]:
    r = requests.get(f"{stack.dicomweb}/studies/{study_uid}/series/{series_uid}/instances", timeout=10)
    if r.status_code in (204, 404) or not r.content:
        return []
    r.raise_for_status()
    return [str(_value(i, "00080018")) for i in r.json()]


def node_outputs(stack: Stack, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs of the node's SR and SC (OT) instances in Orthanc's study, found by QIDO-RS."""
    out: dict[str, list[str]] = {"SR": [], "OT": []}
    for modality in out:
        for s in series_by_modality(stack, study_uid, modality):
            out[modality].extend(qido_instances(stack, study_uid, str(_value(s, "0020000E"))))
    return out


def retrieve(stack: Stack, study_uid: str, sop_uid: str, dest: Path) -> Path:
    """WADO-RS: fetch one instance of the study from Orthanc into ``dest`` (a Part 10 file)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=stack.dicomweb)
    for s in qido_series(stack, study_uid):
        series_uid = str(_value(s, "0020000E"))
        if sop_uid in qido_instances(stack, study_uid, series_uid):
            ds = client.retrieve_instance(study_uid, series_uid, sop_uid)
            ds.save_as(dest, enforce_file_format=True)
            return dest
    raise AssertionError(f"instance {sop_uid} not in Orthanc")


# -- node processes ----------------------------------------------------------------------------------------


def write_node_config(
    path: Path,
    *,
    data_dir: Path,
    dicom_port: int,
    http_port: int,
    destinations: Sequence[Mapping[str, Any]],
    quiet_s: float = 2.0,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 2.0,
    max_attempts: int = 30,
) -> Path:
    cfg = {
        "data_dir": str(data_dir),
        "dicom": {
            "ae_title": "DICOMNODE",
            "host": "127.0.0.1",
            "port": dicom_port,
            "allowed_calling_aets": ["ORTHANC", "MODALITY", "STORESCU"],
        },
        "http": {"host": "127.0.0.1", "port": http_port},
        "completion": {"series_quiet_seconds": quiet_s, "study_quiet_seconds": quiet_s},
        "delivery": {
            "max_attempts": max_attempts,
            "backoff_base_seconds": backoff_base_s,
            "backoff_max_seconds": backoff_max_s,
        },
        "destinations": [dict(d) for d in destinations],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class NodeProcess:
    """``dicomnode ROLE --config FILE`` as a child process, logging into ``log``."""

    def __init__(self, role: str, config: Path, log: Path, http_port: int, *args: str) -> None:
        self.role = role
        self.config = config
        self.log = log
        self.http_port = http_port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> NodeProcess:
        env = dict(os.environ, TCP_NODELAY="1", DICOMNODE_ADMIN_PASSWORD=ADMIN[1])
        cmd = [sys.executable, "-m", "dicomnode", "-v", self.role, "--config", str(self.config)]
        cmd += ["--http-port", str(self.http_port), *self.args]
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.role} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            r = requests.get(f"http://127.0.0.1:{self.http_port}/api/health", timeout=2)
            return r.status_code == 200

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if healthy():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.role} did not answer /api/health:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


@contextlib.contextmanager
def running(*procs: NodeProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def open_store(data_dir: Path) -> Any:
    """The node's database (SQLite in its data dir), for assertions on what it recorded."""
    from dicomnode.store import Store, make_engine

    return Store(make_engine(f"sqlite:///{data_dir / 'dicomnode.sqlite3'}"))


def stow_to_node(http_port: int, files: Sequence[Path], batch: int = 40) -> None:
    """STOW-RS the files into the node (``/dicomweb/studies``), in batches; every instance must be stored."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = ADMIN
    client = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicomweb", session=session)
    for i in range(0, len(files), batch):
        datasets = [pydicom.dcmread(f) for f in files[i : i + batch]]
        resp = client.store_instances(datasets=datasets)
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        assert not failed, f"STOW-RS into the node failed for {len(failed or [])} instance(s)"


# -- a slow relay ------------------------------------------------------------------------------------------


class SlowRelay:
    """A TCP relay to ``target`` that limits the rate towards it (a slow link to the PACS)."""

    def __init__(self, target_port: int, bytes_per_s: float) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(
                target=self._pump, args=(client, upstream, self.bytes_per_s), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, bytes_per_s: float) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if bytes_per_s:
                    time.sleep(len(data) / bytes_per_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def orthanc_instance_count(stack: Stack, study_uid: str) -> int:
    """How many instances of the study Orthanc holds (QIDO-RS over all its series)."""
    return sum(
        len(qido_instances(stack, study_uid, str(_value(s, "0020000E"))))
        for s in qido_series(stack, study_uid)
    )


def storescu_into_orthanc(
    stack: Stack, folder: Path, study_uid: str, expected: int, *, aet: str = "STORESCU"
) -> None:
    """Send every file under ``folder`` to Orthanc with dcmtk's storescu, as a modality would.

    storescu's exit status alone does not prove Orthanc stored the files (seen under load: exit 0 and an
    empty Orthanc), so the study is looked up in Orthanc afterwards. A send that left Orthanc without the
    study is repeated once (C-STORE of the same instances is idempotent); the verbose output of every
    attempt is kept for the failure message. This concerns the modality -> PACS leg only, not the node.
    """
    logs: list[str] = []
    for attempt in (1, 2):
        sent = subprocess.run(
            # options before the positional arguments: dcmtk may otherwise take "+sd" for a file name
            [DCMTK_STORESCU, "-v", "-aet", aet, "-aec", "ORTHANC", "+sd", "+r",
             "127.0.0.1", str(stack.orthanc_dicom), str(folder)],
            env=stack.env(TCP_NODELAY="1"),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        logs.append(
            f"attempt {attempt}: exit {sent.returncode}\n{sent.stdout[-4000:]}\n{sent.stderr[-4000:]}"
        )
        assert sent.returncode == 0, logs[-1]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if orthanc_instance_count(stack, study_uid) >= expected:
                    return
            time.sleep(0.5)
    raise AssertionError("storescu exited 0 but Orthanc does not hold the study:\n" + "\n".join(logs))
