"""Delivery status classification, result combination and retry policy (pure parts of dicomnode.delivery)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode.config import DeliverySettings, DicomwebDestination, DimseDestination
from dicomnode.delivery import (
    DeliveryResult,
    DicomwebPeer,
    DimsePeer,
    FileStatus,
    RetryPolicy,
    StatusClass,
    classify_dimse_status,
    classify_http_status,
    deliver,
    to_peer,
)
from dicomnode.delivery.result import combine
from dicomnode.domain import DeliveryOutcome
from dicomnode.errors import ConfigError, PermanentError, RetryableError


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (0x0000, StatusClass.SUCCESS),
        (0x0001, StatusClass.WARNING),
        (0xB000, StatusClass.WARNING),
        (0xB007, StatusClass.WARNING),
        (0xA700, StatusClass.TRANSIENT),
        (0xA7FF, StatusClass.TRANSIENT),
        (0x0213, StatusClass.TRANSIENT),
        (0x0110, StatusClass.TRANSIENT),
        (0x0122, StatusClass.PERMANENT),
        (0x0124, StatusClass.PERMANENT),
        (0xA900, StatusClass.PERMANENT),
        (0xA9FF, StatusClass.PERMANENT),
        (0xC000, StatusClass.PERMANENT),
        (0xC211, StatusClass.PERMANENT),
        (0x1234, StatusClass.PERMANENT),
    ],
)
def test_dimse_status_classes(code: int, cls: StatusClass) -> None:
    assert classify_dimse_status(code) is cls


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (200, StatusClass.SUCCESS),
        (202, StatusClass.SUCCESS),
        (400, StatusClass.PERMANENT),
        (401, StatusClass.PERMANENT),
        (404, StatusClass.PERMANENT),
        (409, StatusClass.PERMANENT),
        (415, StatusClass.PERMANENT),
        (408, StatusClass.TRANSIENT),
        (429, StatusClass.TRANSIENT),
        (500, StatusClass.TRANSIENT),
        (503, StatusClass.TRANSIENT),
    ],
)
def test_http_status_classes(code: int, cls: StatusClass) -> None:
    assert classify_http_status(code) is cls


def _fs(name: str, outcome: DeliveryOutcome, status: int | None = 0) -> FileStatus:
    return FileStatus(Path(name), name, status, outcome, f"{name}: {outcome.value}")


def test_combine_permanent_beats_transient_beats_success() -> None:
    ok = _fs("a", DeliveryOutcome.SUCCESS)
    warn = _fs("w", DeliveryOutcome.SUCCESS, 0xB000)
    tr = _fs("t", DeliveryOutcome.RETRYING, 0xA700)
    pe = _fs("p", DeliveryOutcome.PERMANENT_FAILURE, 0x0122)
    r = combine("pacs", [ok, warn])
    assert r.ok and r.warnings == 1 and r.error() is None and r.failed_files() == []
    r = combine("pacs", [ok, tr])
    assert r.outcome is DeliveryOutcome.RETRYING and r.transient
    assert r.failed_files() == [Path("t")]
    with pytest.raises(RetryableError, match="pacs"):
        r.raise_for_outcome()
    r = combine("pacs", [ok, tr, pe])
    assert r.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert set(r.failed_files()) == {Path("t"), Path("p")}
    assert isinstance(r.error(), PermanentError)
    assert "1/3 stored" in r.message


def test_backoff_is_exponential_and_capped() -> None:
    p = RetryPolicy(max_attempts=10, base_delay_s=30, max_delay_s=600)
    assert [p.delay_after(n) for n in range(1, 7)] == [30, 60, 120, 240, 480, 600]
    assert p.delay_after(10_000) == 600
    with pytest.raises(ValueError):
        p.delay_after(0)


@given(attempt=st.integers(min_value=1, max_value=500), jitter=st.floats(min_value=0, max_value=0.9))
def test_jittered_delay_stays_within_bounds(attempt: int, jitter: float) -> None:
    p = RetryPolicy(max_attempts=3, base_delay_s=5, max_delay_s=300, jitter=jitter)
    plain = RetryPolicy(max_attempts=3, base_delay_s=5, max_delay_s=300).delay_after(attempt)
    d = p.delay_after(attempt, random.Random(attempt))
    assert plain * (1 - jitter) - 1e-9 <= d <= plain + 1e-9


def test_decide_stops_on_permanent_and_after_max_attempts() -> None:
    p = RetryPolicy(max_attempts=3, base_delay_s=1, max_delay_s=10)
    transient = DeliveryResult("d", DeliveryOutcome.RETRYING, "peer down")
    permanent = DeliveryResult("d", DeliveryOutcome.PERMANENT_FAILURE, "rejected")
    success = DeliveryResult("d", DeliveryOutcome.SUCCESS, "ok")
    assert p.decide(success, 1) == (DeliveryOutcome.SUCCESS, None)
    assert p.decide(permanent, 1) == (DeliveryOutcome.PERMANENT_FAILURE, None)
    assert p.decide(transient, 1) == (DeliveryOutcome.RETRYING, 1)
    assert p.decide(transient, 2) == (DeliveryOutcome.RETRYING, 2)
    assert p.decide(transient, 3) == (DeliveryOutcome.PERMANENT_FAILURE, None)


def test_policy_from_settings_and_validation() -> None:
    p = RetryPolicy.from_settings(
        DeliverySettings(max_attempts=4, backoff_base_seconds=2, backoff_max_seconds=8)
    )
    assert (p.max_attempts, p.base_delay_s, p.max_delay_s) == (4, 2, 8)
    for bad in (
        {"max_attempts": 0},
        {"base_delay_s": 10, "max_delay_s": 5},
        {"multiplier": 0.5},
        {"jitter": 1.0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_config_destinations_become_peers() -> None:
    d = DimseDestination(kind="dimse", name="pacs", ae_title="PACS", host="10.0.0.5", port=104)
    peer = to_peer(d, calling_ae_title="BMDNODE")
    assert peer == DimsePeer("PACS", "10.0.0.5", 104, "BMDNODE", 30.0, "pacs")
    d2 = DimseDestination(kind="dimse", name="p2", ae_title="PACS", host="h", port=1, calling_ae="OTHER")
    assert isinstance(to_peer(d2), DimsePeer) and to_peer(d2).calling_ae_title == "OTHER"  # type: ignore[union-attr]
    w = DicomwebDestination.model_validate(
        {"kind": "dicomweb", "name": "web", "url": "http://h:8042/dicom-web/",
         "auth": {"kind": "basic", "username": "u", "password": "s3cret"}}
    )  # fmt: skip
    wp = to_peer(w)
    assert wp == DicomwebPeer("http://h:8042/dicom-web", "web", 30.0, "u", "s3cret", None)
    b = DicomwebDestination.model_validate(
        {"kind": "dicomweb", "name": "b", "url": "https://h/dw", "auth": {"kind": "bearer", "token": "tok"}}
    )
    assert to_peer(b).token == "tok"  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        to_peer(object())


def test_nothing_to_send_is_success() -> None:
    r = deliver(DimsePeer("PACS", "127.0.0.1", 1), [])
    assert r.ok and r.files == ()
