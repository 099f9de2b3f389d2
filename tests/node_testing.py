"""A real ``dicomnode receive`` process for the hardening and fuzz tests: C-STORE SCP and HTTP with STOW-RS,
started from a config file in a child process (so that its memory can be measured on its own), waited for,
and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from web_testing import ADMIN_PASSWORD

from dicomnode.netutil import free_port

__all__ = ["ADMIN_PASSWORD", "Receiver", "running_receiver"]


@dataclass(frozen=True)
class Receiver:
    """A running receiver: its process, HTTP root and DICOM port."""

    proc: subprocess.Popen[bytes]
    url: str
    dicom_port: int
    data_dir: Path
    log: Path

    def status_kb(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in kB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


@contextmanager
def running_receiver(work: Path, **sections: Any) -> Iterator[Receiver]:
    """``dicomnode receive`` on free ports with data in ``work``; ``sections`` are merged into the config
    (``http={...}``, ``dicom={...}``)."""
    work.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "data_dir": str(work / "data"),
        "dicom": {"port": dicom_port, "free_space_floor_mb": 0},
        "http": {"port": http_port},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    config = work / "receiver.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = work / "receiver.log"
    env = {**os.environ, "DICOMNODE_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "receive", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"receiver exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(url + "/api/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"receiver not ready: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield Receiver(proc, url, dicom_port, work / "data", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
