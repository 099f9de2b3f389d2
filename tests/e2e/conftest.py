"""Fixtures of the end-to-end tests (helpers in ``e2e_support``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import PhantomStudy, Stack, make_phantom_study, require_tools


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    """One small three-series phantom study (localizer, bone kernel, 3 mm soft), written once per session."""
    return make_phantom_study(tmp_path_factory.mktemp("phantom") / "study")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A local-stack state dir with free ports; whatever was started in it is stopped afterwards."""
    require_tools("Orthanc")
    st = Stack(tmp_path / "stack")
    try:
        yield st
    finally:
        st.down()
