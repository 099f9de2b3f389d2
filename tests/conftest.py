"""Shared fixtures: where the shared test data lives, and temporary directories.

The shared data (real CT files) lives beside the checkout in ``../shared/data`` (override with
``DICOMNODE_TEST_DATA``). When it is absent, tests that need it skip with a clear message, except under CI
(``CI=true``), where its absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    env = os.environ.get("DICOMNODE_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (or fails under CI) when it is missing."""
    path = _data_dir()
    if not (path / "README.md").is_file():
        msg = f"shared test data not found at {path} (set DICOMNODE_TEST_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def abdomen_ct(shared_data: Path) -> Path:
    return shared_data / "totalsegmentator_abdomen_nifti" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def abdomen_seg(shared_data: Path) -> Path:
    return shared_data / "totalsegmentator_abdomen_nifti" / "example_seg_fast_force_split.nii.gz"


@pytest.fixture(autouse=True)
def _no_log_rate_limit_across_tests() -> object:
    """A STOW-RS router attaches a repeat filter to the ingest loggers (``ingest.lograte``) for the life of
    the process; tests must not inherit another test's counts (a line a test asserts would be dropped)."""
    yield
    import logging

    from dicomnode.ingest.lograte import RepeatFilter

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for f in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
                logger.removeFilter(f)
