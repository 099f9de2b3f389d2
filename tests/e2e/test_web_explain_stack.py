"""Acceptance: with the node running and a three-series study received, ``POST /api/rules/explain`` picks the
3 mm soft series and gives reasons for all three series.

``test_explain_on_the_local_stack`` runs the node of ``deploy/local-stack.sh`` (a ``dicomnode serve`` process
next to Orthanc) and sends the study into it over STOW-RS (authenticated as the admin). When Orthanc is not
installed, ``test_explain_on_a_uvicorn_node`` checks the same on the node's HTTP app under uvicorn,
the study arriving through its STOW-RS route.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_support import ADMIN, PhantomStudy, Stack, free_port, require_tools, stow_to_node, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _check_explain(base_url: str, study: PhantomStudy) -> dict[str, Any]:
    # Anonymous: refused.
    assert (
        requests.post(
            f"{base_url}/api/rules/explain", json={"study_instance_uid": "1.2"}, timeout=10
        ).status_code
        == 401
    )
    r = requests.post(
        f"{base_url}/api/rules/explain", json={"study_instance_uid": study.study_uid}, auth=ADMIN, timeout=60
    )
    assert r.status_code == 200, r.text
    series = {s["series_instance_uid"]: s for s in r.json()["series"]}
    assert set(series) == set(study.series.values())  # all three series, nothing else
    selected = [uid for uid, s in series.items() if s["selected"]]
    assert selected == [study.series["soft"]]
    for s in series.values():
        assert s["reasons"], s
    soft, bone, loc = (series[study.series[k]] for k in ("soft", "bone", "localizer"))
    assert soft["rule"] == "abdominal-ct-bmd" and soft["rank"] == 1
    assert any("ranking: 1 of 2" in x for x in soft["reasons"])
    assert bone["rule"] == "abdominal-ct-bmd" and any("ranks higher" in x for x in bone["reasons"])
    assert loc["rule"] is None and any("LOCALIZER" in x and "FAIL" in x for x in loc["reasons"])
    body: dict[str, Any] = r.json()
    return body


def test_explain_on_the_local_stack(stack: Stack, phantom_study: PhantomStudy) -> None:
    require_tools("Orthanc")
    stack.up(NODE_DESTINATION="dimse", DICOMNODE_ADMIN_PASSWORD=ADMIN[1])
    base = f"http://127.0.0.1:{stack.node_http}"
    stow_to_node(stack.node_http, phantom_study.all_files)

    def received() -> bool:
        r = requests.get(f"{base}/api/studies/{phantom_study.study_uid}", auth=ADMIN, timeout=10)
        return r.status_code == 200 and r.json()["study"]["n_instances"] == len(phantom_study.all_files)

    wait_for("the study in the node's database", received, timeout=60)
    _check_explain(base, phantom_study)


@pytest.fixture
def uvicorn_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import uvicorn

    from dicomnode.config import load_settings
    from dicomnode.ingest import Spool
    from dicomnode.ingest.stow import build_stow_router
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.store import Store, make_engine, upgrade
    from dicomnode.web.app import create_app

    port = free_port()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"data_dir: data\nhttp: {{port: {port}}}\ndicom: {{free_space_floor_mb: 0}}\n")
    settings = load_settings(cfg, environ={})
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    spool = Spool(settings.spool_dir, StoreSink(store))
    monkeypatch.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN[1])
    app = create_app(settings, store, routers=[build_stow_router(spool)])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


def test_explain_on_a_uvicorn_node(uvicorn_node: str, phantom_study: PhantomStudy) -> None:
    port = int(uvicorn_node.rsplit(":", 1)[1])
    # STOW-RS into the node needs credentials too.
    anon = requests.post(f"{uvicorn_node}/dicomweb/studies", data=b"", timeout=10)
    assert anon.status_code == 401
    stow_to_node(port, phantom_study.all_files)
    _check_explain(uvicorn_node, phantom_study)
