"""Issue 14's fuzz run: random and mutated PDUs against the C-STORE SCP over TCP, mutated multipart bodies
against STOW-RS, on a real ``dicomnode receive`` process; afterwards the node still answers C-ECHO and
``/api/health``, and its memory stayed within :data:`RSS_GROWTH_BOUND_KB` of where it started.

Bounded in count (:data:`PDU_CASES`, :data:`STOW_CASES`) and in time (:data:`TIME_BUDGET_S`, half for each
part: cases still to go when the budget is spent are skipped, so a slow machine runs fewer, never longer).
Seeded: a failure replays with the same inputs. Every STOW-RS answer must be a deliberate one (never 500),
and the HTTP side must not log an ASGI traceback.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
from dicom_testing import make_instances
from node_testing import ADMIN_PASSWORD, Receiver, running_receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 14
PDU_CASES = 240
STOW_CASES = 160
#: Wall-clock budget of the fuzzing itself (start-up and the final checks come on top).
TIME_BUDGET_S = 40.0
#: How much the receiver's resident memory may grow over the whole run.
RSS_GROWTH_BOUND_KB = 64 * 1024
#: Answers a STOW-RS request may get (stored, partly stored, refused, malformed, too large, wrong type).
#: C-ECHO / health tries (half a second apart) after a run: idle peers' slots must be free by then.
RECOVERY_TRIES = 16
STOW_ANSWERS = {200, 202, 400, 409, 413, 415}
BOUNDARY = "fuzz-boundary"


# -- PDUs ----------------------------------------------------------------------------------------------------


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(called: bytes = b"DICOMNODE", calling: bytes = b"FUZZER") -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification (PS3.8 9.3.2), built by hand so it can be broken."""
    app_context = _item(0x10, b"1.2.840.10008.3.1.1.1")
    abstract = _item(0x30, b"1.2.840.10008.1.1")
    transfer = _item(0x40, b"1.2.840.10008.1.2")
    context = _item(0x20, bytes([1, 0, 0, 0]) + abstract + transfer)
    max_len = _item(0x51, struct.pack(">I", 16384))
    impl = _item(0x52, b"1.2.3.4")
    user = _item(0x50, max_len + impl)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)[:16]
        + calling.ljust(16)[:16]
        + b"\0" * 32
        + app_context
        + context
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _pdu_cases(rng: random.Random) -> list[bytes]:
    good = associate_rq()
    p_data = struct.pack(">BBI", 0x04, 0, 12) + struct.pack(">IBB", 6, 1, 0x03) + b"\0\0\0\0"
    mutators: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 2048)),  # random bytes
        lambda: good[: rng.randint(1, len(good) - 1)],  # cut short
        lambda: _flip(rng, good, rng.randint(1, 12)),  # a few bytes changed
        lambda: (
            bytes([rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x09, 0xFF])]) + good[1:]
        ),  # another PDU type
        lambda: good[:2] + struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF])) + good[6:],
        lambda: associate_rq(called=b"DICOMNODE\0\0\0", calling=b"\0" * rng.randint(1, 16)),  # NUL padding
        lambda: associate_rq(calling=bytes(rng.randint(0, 255) for _ in range(16))),
        lambda: good + p_data + rng.randbytes(rng.randint(0, 256)),  # associate, then junk P-DATA
        lambda: good * rng.randint(2, 4),  # repeated requests on one connection
    ]
    return [rng.choice(mutators)() for _ in range(PDU_CASES)]


def _flip(rng: random.Random, data: bytes, n: int) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _send_pdu(port: int, data: bytes) -> None:
    """Connect, send, read whatever comes back for a moment, close (the peer may reset: that is fine)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(0.05)
            s.sendall(data)
            with contextlib.suppress(OSError):
                s.recv(4096)
    except OSError:
        pass


# -- STOW-RS bodies ------------------------------------------------------------------------------------------


def _multipart(parts: list[bytes]) -> bytes:
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _stow_cases(rng: random.Random, instances: list[bytes]) -> list[tuple[bytes, str]]:
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    good = _multipart(instances)
    sep = f"--{BOUNDARY}".encode()

    def at_boundaries() -> bytes:
        cut = [i for i in range(len(good)) if good.startswith(sep, i)]
        i = rng.choice(cut) + rng.randint(0, len(sep) + 4)
        return good[:i] + rng.randbytes(rng.randint(0, 8)) + good[i + rng.randint(0, 8) :]

    mutators: list[Callable[[], tuple[bytes, str]]] = [
        lambda: (_flip(rng, good, rng.randint(1, 40)), ctype),  # bytes changed anywhere
        lambda: (good[: rng.randint(0, len(good))], ctype),  # cut short
        lambda: (at_boundaries(), ctype),  # damage at a delimiter
        lambda: (_multipart([_flip(rng, p, rng.randint(1, 20)) for p in instances]), ctype),  # DICOM damaged
        lambda: (_multipart([p[: rng.randint(0, len(p))] for p in instances]), ctype),  # truncated parts
        lambda: (_multipart([rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 300))]), ctype),
        lambda: (good.replace(b"\r\n", b"\n", rng.randint(1, 4)), ctype),  # bare line feeds
        lambda: (good, ctype.replace(BOUNDARY, rng.choice(["", "x" * 300, "other", BOUNDARY[:-1]]))),
        lambda: (
            good,
            rng.choice(["application/dicom", "multipart/mixed", "text/plain", "", "multipart/related"]),
        ),
        lambda: (
            good.replace(b"Content-Type: application/dicom", b"X: " + b"h" * rng.randint(1, 40000), 1),
            ctype,
        ),
        lambda: (rng.randbytes(rng.randint(0, 4096)), ctype),  # not multipart at all
    ]
    return [rng.choice(mutators)() for _ in range(STOW_CASES)]


# -- the run -------------------------------------------------------------------------------------------------


def _echo(port: int) -> int | None:
    """C-ECHO status from a fresh association (pynetdicom as the SCU), None when no association."""
    from pynetdicom import AE

    ae = AE(ae_title="FUZZCHECK")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def _node_answers(node: Receiver) -> tuple[int | None, bool]:
    """(C-ECHO status, /api/health ok), retried for a few seconds while connections of the run wind down."""
    status, health = None, False
    for _ in range(RECOVERY_TRIES):
        status = _echo(node.dicom_port)
        health = requests.get(node.url + "/api/health", timeout=10).ok
        if status == 0 and health:
            break
        time.sleep(0.5)
    return status, health


@dataclass
class _Run:
    node: Receiver
    rng: random.Random
    rss_start_kb: int
    instances: list[bytes]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Run]:
    """One receiver for the whole run: the STOW-RS bodies first, then the PDUs; the checks after each."""
    tmp = tmp_path_factory.mktemp("fuzz")
    instances = [p.read_bytes() for p in make_instances(tmp / "src", 3)]
    with running_receiver(tmp / "node") as node:
        assert _echo(node.dicom_port) == 0
        yield _Run(node, random.Random(SEED), node.status_kb("VmRSS"), instances)
        log = node.log.read_text(errors="replace")
    assert "Exception in ASGI application" not in log


def _assert_still_answering(run: _Run) -> None:
    status, health = _node_answers(run.node)
    rss_end = run.node.status_kb("VmRSS")
    assert health, "/api/health failed after the fuzz run"
    assert status == 0, f"C-ECHO failed after the fuzz run (status {status})"
    assert rss_end - run.rss_start_kb < RSS_GROWTH_BOUND_KB, (run.rss_start_kb, rss_end)


def test_mutated_stow_bodies(run: _Run) -> None:
    t0 = time.monotonic()
    answers: dict[int, int] = {}
    session = requests.Session()
    session.auth = ("admin", ADMIN_PASSWORD)
    for body, ctype in _stow_cases(run.rng, run.instances):
        if time.monotonic() - t0 > TIME_BUDGET_S / 2:
            break
        r = session.post(
            run.node.url + "/dicomweb/studies", data=body, headers={"Content-Type": ctype}, timeout=30
        )
        answers[r.status_code] = answers.get(r.status_code, 0) + 1
    assert sum(answers.values()) >= min(STOW_CASES, 50)
    assert set(answers) <= STOW_ANSWERS, answers  # a deliberate answer each time, never a 500
    assert "Exception in ASGI application" not in run.node.log.read_text(errors="replace")
    _assert_still_answering(run)


def test_random_and_mutated_pdus(run: _Run) -> None:
    t0 = time.monotonic()
    sent = 0
    for data in _pdu_cases(run.rng):
        if time.monotonic() - t0 > TIME_BUDGET_S / 2:
            break
        _send_pdu(run.node.dicom_port, data)
        sent += 1
    assert sent >= min(PDU_CASES, 50)
    _assert_still_answering(run)
