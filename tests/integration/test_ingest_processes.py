"""Several receiving processes on one DICOM port (``dicom.receive_processes``, dicomnode.ingest.processes).

The guarantee does not depend on which process receives: kill -9 of a receiving process, or of the node's
process that started them, loses no acknowledged instance (file with identical bytes, and its record); the
killed receiver is replaced; the receivers end with the node's process (SIGTERM, or kill -9: no orphans);
association limits and metrics hold for the node as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dicom_testing import assert_all_recorded, ct_slice
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicomnode.cli.node import receiver_spool
from dicomnode.config import Settings
from dicomnode.ingest import prometheus as metrics
from dicomnode.ingest.processes import ReceiverPool
from dicomnode.netutil import free_port, wait_port
from dicomnode.store import Store, make_engine, upgrade

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def ct(study: str, series: str, k: int, size: int = 64) -> Dataset:
    return ct_slice(study, series, k, size, patient="Many^Receivers")


def children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: object, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


POOL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from dicomnode.cli.node import receiver_spool
    from dicomnode.config import Settings
    from dicomnode.ingest.processes import ReceiverPool
    from dicomnode.store import make_engine, upgrade
    dicom = {"port": int(sys.argv[2]), "receive_processes": 2, "durability": sys.argv[3]}
    settings = Settings(data_dir=Path(sys.argv[1]), dicom=dicom)
    upgrade(make_engine(settings.database_url_resolved()))
    pool = ReceiverPool(settings, receiver_spool, 2)
    pool.start()
    print(json.dumps({"port": pool.port, "pids": pool.pids()}), flush=True)
    while True:
        time.sleep(1)
    """
)


@contextlib.contextmanager
def pool_process(
    data: Path, durability: str = "power"
) -> Iterator[tuple[subprocess.Popen[str], int, list[int]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL_SCRIPT, str(data), str(free_port()), durability],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield proc, int(info["port"]), [int(p) for p in info["pids"]]
    finally:
        with contextlib.suppress(ProcessLookupError):
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait(10)


class Senders:
    """Four associations storing in parallel until stopped; what was answered 0x0000 is kept."""

    def __init__(self, port: int, study: str) -> None:
        self.port, self.study = port, study
        self.acked: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(k,)) for k in range(4)]

    def __enter__(self) -> Senders:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _send(self, k: int) -> None:
        series = generate_uid()
        ae = AE(f"SENDER{k}")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
        if not assoc.is_established:
            return
        try:
            for i in range(2000):
                if self.stop.is_set():
                    break
                ds = ct(self.study, series, i)
                try:
                    status = assoc.send_c_store(ds)
                except RuntimeError:  # the kill aborted the association between two requests
                    return
                if status is None or "Status" not in status or status.Status != 0x0000:
                    return
                with self.lock:
                    self.acked[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
                self.started.set()
        finally:
            if assoc.is_established:
                assoc.release()


@pytest.mark.parametrize("durability", ["power", "process"])
def test_kill_9_of_a_receiving_process_loses_nothing_and_it_is_replaced(
    tmp_path: Path, durability: str
) -> None:
    study = generate_uid()
    with pool_process(tmp_path, durability) as (proc, port, pids):
        assert len(pids) == 2 and children(proc.pid) >= set(pids)
        with Senders(port, study) as senders:
            assert senders.started.wait(60)
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(0.5)
        assert len(senders.acked) > 10, "the kill came while storing"
        # The killed receiver is replaced; the port still takes associations.
        assert wait_until(lambda: len(children(proc.pid) - {pids[0]}) >= 2), "no replacement started"
        with Senders(port, study) as more:
            assert more.started.wait(60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert_all_recorded(tmp_path / "dicomnode.sqlite3", study, {**senders.acked, **more.acked})


@pytest.mark.parametrize("durability", ["power", "process"])
def test_kill_9_of_the_node_process_loses_nothing_and_leaves_no_orphan(
    tmp_path: Path, durability: str
) -> None:
    study = generate_uid()
    with pool_process(tmp_path, durability) as (proc, port, pids):
        with Senders(port, study) as senders:
            assert senders.started.wait(60)
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # The receivers notice that the node's process is gone and stop (aborting their associations).
            assert wait_until(lambda: not any(alive(p) for p in pids)), "receiving processes left running"
        assert len(senders.acked) > 10
    assert_all_recorded(tmp_path / "dicomnode.sqlite3", study, senders.acked)


def test_sigterm_to_receive_stops_its_receiving_processes(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "dicom": {"port": port, "receive_processes": 2},
                "http": {"port": http},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "receive", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_port(port, timeout=60)
        assert wait_until(lambda: len(children(proc.pid)) >= 2, 60)
        receivers = children(proc.pid)
        ae = AE("ECHOSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_echo()
        assert status is not None and status.Status == 0x0000
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_until(lambda: not any(alive(p) for p in receivers), 10), "orphan receiving processes"
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ReceiverPool]:
    settings = Settings(
        data_dir=tmp_path,
        dicom={
            "port": free_port(),
            "receive_processes": 2,
            "max_associations": 3,
            "max_associations_per_address": 2,
        },
    )
    upgrade(make_engine(settings.database_url_resolved()))
    receivers = ReceiverPool(settings, receiver_spool, 2)
    receivers.start()
    try:
        yield receivers
    finally:
        receivers.stop()
        assert not any(alive(p) for p in receivers.pids())


def _associate(port: int, source: str = "127.0.0.1") -> object:
    ae = AE("LIMITS")
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(source, 0))


def test_association_limits_hold_across_the_receiving_processes(pool: ReceiverPool) -> None:
    assert pool.port is not None
    open_ = [_associate(pool.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in open_)  # type: ignore[attr-defined]
        # Whichever process takes it, a third from the same address is over max_associations_per_address.
        for _ in range(3):
            third = _associate(pool.port)
            assert third.is_rejected  # type: ignore[attr-defined]
        # From another source address (127.0.0.2 is loopback too): the total of 3 allows one more, no more.
        other = _associate(pool.port, "127.0.0.2")
        assert other.is_established  # type: ignore[attr-defined]
        fourth = _associate(pool.port, "127.0.0.2")
        assert fourth.is_rejected  # type: ignore[attr-defined]
        other.release()  # type: ignore[attr-defined]
    finally:
        for a in open_:
            a.release()  # type: ignore[attr-defined]
    # Released slots are free again, in every process.
    assert wait_until(lambda: _try_and_release(pool.port), 10)


def _try_and_release(port: int | None) -> bool:
    assert port is not None
    a = _associate(port)
    ok = bool(a.is_established)  # type: ignore[attr-defined]
    if ok:
        a.release()  # type: ignore[attr-defined]
    return ok


def test_metrics_of_the_receiving_processes_reach_the_node_process(pool: ReceiverPool) -> None:
    assert pool.port is not None
    counter = metrics.INSTANCES.labels(source="dimse", result="stored")
    before = counter._value.get()
    study = generate_uid()
    with Senders(pool.port, study) as senders:
        assert senders.started.wait(60)
        time.sleep(0.3)
    n = len(senders.acked)
    assert wait_until(lambda: counter._value.get() - before >= n, 10)
    assert counter._value.get() - before == n


def test_tls_and_plain_ports_with_several_receiving_processes(tmp_path: Path) -> None:
    """Mutual TLS on the TLS port and the plain port beside it, served by two receiving processes: a client
    with a valid certificate stores, one without is refused; C-ECHO answers on both ports."""
    from dicom_testing import make_instances
    from tls_testing import make_pki, need

    pki = make_pki(tmp_path / "pki")
    storescu, echoscu = need("/usr/bin/storescu", "dcmtk"), need("/usr/bin/echoscu", "dcmtk")
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom={
            "port": free_port(),
            "receive_processes": 2,
            "tls": {
                "port": free_port(),
                "certificate": str(pki.node.cert),
                "private_key": str(pki.node.key),
                "ca_bundle": str(pki.ca),
                "require_client_certificate": True,
            },
        },
    )
    upgrade(make_engine(settings.database_url_resolved()))
    files = make_instances(tmp_path / "in", 4)
    env = dict(os.environ, TCP_NODELAY="1")

    def run(tool: str, port: int | None, *opts: str, files: tuple[Path, ...] = ()) -> Any:
        return subprocess.run(
            [tool, *opts, "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with ReceiverPool(settings, receiver_spool, 2) as receivers:
        assert receivers.tls_port is not None and receivers.port is not None
        mutual = ["+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)]
        for f in files[:2]:  # two associations: whichever process takes each
            ok = run(storescu, receivers.tls_port, *mutual, files=(f,))
            assert ok.returncode == 0, ok.stderr
        refused = run(storescu, receivers.tls_port, "+tla", "+cf", str(pki.ca), files=(files[2],))
        assert refused.returncode != 0
        plain = run(storescu, receivers.port, files=(files[3],))
        assert plain.returncode == 0, plain.stderr
        assert run(echoscu, receivers.tls_port, *mutual).returncode == 0
        assert run(echoscu, receivers.port).returncode == 0
    engine = make_engine(settings.database_url_resolved())
    assert Store(engine).ingest_totals()[0] == 3  # the refused client stored nothing
    engine.dispose()
