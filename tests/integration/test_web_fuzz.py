"""Property-based fuzzing of the REST API against its own OpenAPI spec (schemathesis): no input gives a 500.

Every operation of ``/api/openapi.json`` is called with schema-conforming (positive) and schema-violating
(negative) requests, as an authenticated admin, on a node holding a received, routed and analysed phantom
study. The example count is bounded so the run stays well under two minutes.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from web_testing import ADMIN_PASSWORD, SeededNode, seed_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

schemathesis = pytest.importorskip("schemathesis")

#: Examples per operation and generation mode.
MAX_EXAMPLES = 25


class _Probe:
    def __call__(self, destination: Any, calling_ae: str) -> Any:
        class R:
            ok, message, elapsed_s = False, "fuzz: not probed", 0.0

        return R()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> SeededNode:
    return seed_node(tmp_path_factory.mktemp("webfuzz"), probe=_Probe())


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_never_answers_500(node: SeededNode, mode: str, tmp_path: Path) -> None:
    from schemathesis import GenerationMode
    from schemathesis.openapi import from_dict

    schema = from_dict(node.app.openapi())
    schema.app = node.app  # calls go through the ASGI app in-process (middleware included)
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    failures: list[str] = []
    calls = [0]
    operations = [r.ok() for r in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 25

    for op in operations:
        try:
            strategy = op.as_strategy(generation_mode=generation)
        except Exception as exc:  # an operation with nothing to negate (no parameters)
            if mode == "negative":
                continue
            raise AssertionError(f"{op.label}: {exc}") from exc

        @given(case=strategy)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(headers=auth)
            calls[0] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.path_parameters} {case.query} {case.body!r:.200}: "
                    f"{response.status_code} {response.text[:200]}"
                )

        try:
            run()
        except Exception as exc:
            if "Unsatisfiable" in type(exc).__name__ or "unsatisfiable" in str(exc).lower():
                continue
            raise
    print(
        f"\nfuzz ({mode}): {calls[0]} requests, {len(operations)} operations, {len(failures)} server errors"
    )
    assert calls[0] > len(operations)
    assert failures == [], "\n".join(failures[:20])
