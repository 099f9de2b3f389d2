"""UID policy: deterministic per (job, version, artefact), random without a job key."""

from __future__ import annotations

from pydicom.uid import UID

from dicomnode.report.uids import UidPolicy


def test_same_job_same_uids() -> None:
    a, b = UidPolicy("job-42", 1), UidPolicy("job-42", 1)
    assert a.deterministic
    assert a.uid("sr-instance") == b.uid("sr-instance")
    assert a.uid("sr-instance") != a.uid("sr-series")


def test_version_and_job_change_uids() -> None:
    base = UidPolicy("job-42", 1).uid("sr-instance")
    assert UidPolicy("job-42", 2).uid("sr-instance") != base
    assert UidPolicy("job-43", 1).uid("sr-instance") != base


def test_random_without_job_key_and_valid() -> None:
    p = UidPolicy()
    assert not p.deterministic
    u1, u2 = p.uid("sr-instance"), p.uid("sr-instance")
    assert u1 != u2
    for u in (u1, UidPolicy("j", 1).uid("x")):
        assert UID(u).is_valid
        assert len(u) <= 64
