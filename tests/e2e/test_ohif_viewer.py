"""A real viewer displays our SR and overlays (issue 10): OHIF's prebuilt build against the test Orthanc.

The local stack (``deploy/local-stack.sh``) starts Orthanc and the bundled viewer (``deploy/ohif_server.py``:
OHIF's build and Orthanc's DICOMweb on one origin). A study is analysed with the real pipeline, the study
and our SR + secondary captures are stored in Orthanc, and Chromium (software WebGL) opens the study in OHIF:

- the SR opens without an error from the viewer (its SR loader crashed on a measurement group without an
  image region);
- every vertebra with an outline is placed on the very source image the SR references, its outline is drawn
  there (a closed polyline of the outline's points) and its vBMD is the first value shown;
- the overlays are one series, in instance order, and each displays.

Screenshots go to ``test-artifacts/ohif/``. The real LIDC chest CT runs the same checks when its analysis
succeeds, and skips with the analysis' reason otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_support import PhantomStudy, Stack, require_tools
from ohif_support import Console, Published, Viewer, browser_context, publish, require_viewer
from PIL import Image

from dicomnode.netutil import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def viewer_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """Orthanc + the bundled viewer from deploy/local-stack.sh (no node: the test analyses itself)."""
    require_tools("Orthanc")
    require_viewer()
    stack = Stack(tmp_path_factory.mktemp("ohif") / "stack")
    port = free_port()
    try:
        stack.up(NODE_START="0", OHIF_START="1", OHIF_PORT=str(port))
        yield stack, f"http://127.0.0.1:{port}"
    finally:
        stack.down()


@pytest.fixture(scope="module")
def context() -> Iterator[Any]:
    with browser_context() as ctx:
        yield ctx


def _vbmd_text(value: float) -> str:
    return f"{value:.2f} mg/cm3"  # how OHIF prints a NUM: two decimals and the unit's code value


def check_sr(viewer: Viewer, published: Published, name: str) -> list[str]:
    """Open the SR and check every outlined vertebra in the viewer; return the levels seen."""
    viewer.open_series(published.sr_series_uid)
    measurements = viewer.sr_measurements(published.sr_series_uid)
    outlined = published.outlined()
    by_level = {m["id"].split()[0]: m for m in measurements}
    assert set(by_level) == set(outlined), (sorted(by_level), sorted(outlined))
    annotations = viewer.annotation_images()
    seen: list[str] = []
    for level, v in outlined.items():
        m = by_level[level]
        sop = v["outline"]["sop_instance_uid"]
        # placed on the source image the SR references (the mid-vertebral slice of result.json)
        assert m["sop"] == sop and f"/instances/{sop}/" in m["imageId"], level
        assert f"/instances/{sop}/" in annotations[m["uid"]], level
        # the headline value first: vBMD, or the mean attenuation where no vBMD could be given
        if v["vbmd_mg_cm3"] is not None:
            headline = ("Volumetric bone mineral density", _vbmd_text(v["vbmd_mg_cm3"]))
        else:
            headline = ("Attenuation Coefficient", f"{v['trabecular_hu_mean']:.2f} [hnsf'U]")
        assert (m["labels"][0]["label"].split(",")[0], m["labels"][0]["value"]) == headline, level
        viewer.show_image(m["imageId"])
        assert f"/instances/{sop}/" in viewer.current_image_id()
        drawn = viewer.drawn(m["uid"], headline[1])
        assert headline[1] in drawn["text"], (level, drawn["text"][:200])
        n_points = len(v["outline"]["points_cr"])
        # the outline: a polyline of (about) the outline's points; cornerstone may drop the closing point
        assert any(abs(n - n_points) <= 1 for n in drawn["polylines"]), (level, n_points, drawn["polylines"])
        viewer.screenshot(f"{name}_sr_{level}")
        seen.append(level)
    return seen


def check_overlays(viewer: Viewer, published: Published, name: str) -> None:
    """The secondary captures: one series, instance numbers 1..n in order, each displayed."""
    sets = [d for d in viewer.display_sets() if d["series"] == published.sc_series_uid]
    assert len(sets) == 1, sets
    instances = sets[0]["instances"]
    assert [n for _, n in instances] == list(range(1, len(published.sc_sop_uids) + 1))
    assert [sop for sop, _ in instances] == list(published.sc_sop_uids)
    viewer.open_series(published.sc_series_uid)
    for i, sop in enumerate(published.sc_sop_uids):
        image_id = viewer.show_index(i)
        assert f"/instances/{sop}/" in image_id
        shot = viewer.viewport_screenshot(f"{name}_sc_{i:02d}")
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        # an overlay shows coloured labels and a grey image: many distinct colours, not a blank viewport
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, (i, sop)


def _run_viewer_checks(context: Any, base_url: str, published: Published, name: str) -> None:
    page = context.new_page()
    console = Console()
    console.attach(page)
    try:
        viewer = Viewer(page, base_url, published.study_uid)
        viewer.screenshot(f"{name}_study")
        levels = check_sr(viewer, published, name)
        assert levels
        check_overlays(viewer, published, name)
        assert console.errors == [], console.errors
    finally:
        page.close()


@pytest.fixture(scope="module")
def phantom_published(
    viewer_stack: tuple[Stack, str], phantom_study: PhantomStudy, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    stack, _ = viewer_stack
    soft = phantom_study.files["soft"]
    out = tmp_path_factory.mktemp("phantom-out")
    published = publish(soft[0].parent, phantom_study.all_files, out, stack.orthanc_url)
    assert published.study_uid == phantom_study.study_uid
    return published


def test_phantom_study_sr_and_overlays_in_ohif(
    viewer_stack: tuple[Stack, str], phantom_published: Published, context: Any
) -> None:
    _, base_url = viewer_stack
    _run_viewer_checks(context, base_url, phantom_published, "phantom")


def test_demo_link_opens_the_sr(
    viewer_stack: tuple[Stack, str], phantom_published: Published, context: Any
) -> None:
    """The link deploy/demo-stack.sh prints (initialSeriesInstanceUID = the SR series) shows the report."""
    _, base_url = viewer_stack
    page = context.new_page()
    console = Console()
    console.attach(page)
    try:
        viewer = Viewer(
            page,
            base_url,
            f"{phantom_published.study_uid}&initialSeriesInstanceUID={phantom_published.sr_series_uid}",
        )
        measurements = viewer.sr_measurements(phantom_published.sr_series_uid)
        outlined = phantom_published.outlined()
        first = measurements[0]
        page.wait_for_function(
            "(sop) => { const vid = window.services.viewportGridService.getState().activeViewportId;"
            " const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(vid);"
            " return vp && (vp.getCurrentImageId() || '').includes('/instances/' + sop + '/'); }",
            arg=first["sop"],
        )
        level = first["id"].split()[0]
        vbmd = outlined[level]["vbmd_mg_cm3"]
        if vbmd is not None:
            page.wait_for_function(
                '([uid, text]) => Array.from(document.querySelectorAll(`g[data-annotation-uid="${uid}"]`))'
                ".some(g => g.textContent.includes(text))",
                arg=[first["uid"], _vbmd_text(vbmd)],
            )
        viewer.screenshot("phantom_demo_link")
        assert console.errors == [], console.errors
    finally:
        page.close()


def test_real_chest_ct_sr_in_ohif(viewer_stack: tuple[Stack, str], context: Any, tmp_path: Path) -> None:
    """The LIDC-IDRI chest CT (GE), when the measurement succeeds on it."""
    data = Path(
        os.environ.get("DICOMNODE_TEST_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data"
    )
    folder = data / "lidc_idri_0001_chest_dicom" / "dicom"
    if not folder.is_dir():
        msg = f"LIDC chest CT not found at {folder} (set DICOMNODE_TEST_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    stack, base_url = viewer_stack
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    published = publish(folder, files, tmp_path / "out", stack.orthanc_url)
    _run_viewer_checks(context, base_url, published, "lidc")
