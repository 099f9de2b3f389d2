"""Helpers of the real-viewer test: OHIF's build (``.ohif/``, installed by ``./setup.sh``), Chromium driven by
Playwright, publishing an analysis into the test Orthanc, and reading what the viewer shows.

What the viewer shows is read from the page itself: OHIF exposes its services as ``window.services`` (display
sets, viewports) and cornerstone's tools as ``window.cornerstoneTools`` (annotations); the outline and the
text the SR display tool draws are SVG elements of the viewport.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / ".ohif" / "dist"
ARTIFACTS = REPO / "test-artifacts" / "ohif"
CHROMIUM = "/usr/bin/chromium"
#: Software WebGL (SwiftShader through ANGLE): OHIF renders with WebGL, and there is no GPU here.
CHROMIUM_ARGS = [
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _missing(msg: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + " -- required under CI")
    pytest.skip(msg)


def require_viewer() -> Any:
    """Playwright's ``sync_playwright`` when OHIF's build, Chromium and Playwright are all here."""
    if not (OHIF_DIST / "index.html").is_file():
        _missing(f"OHIF viewer not installed in {OHIF_DIST} (./setup.sh --no-demo installs it)")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        _missing("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    return sync_playwright


# -- publishing an analysis into the PACS -----------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One analysed series, its study and our outputs, stored in Orthanc."""

    study_uid: str
    result: dict[str, Any]
    sr_series_uid: str
    sc_series_uid: str
    sc_sop_uids: tuple[str, ...]  # in instance-number order

    def outlined(self) -> dict[str, dict[str, Any]]:
        """Level -> vertebra of result.json, for every vertebra with an outline on a source image."""
        return {
            v["level"]: v
            for v in self.result["vertebrae"]
            if v.get("outline") and v["outline"].get("sop_instance_uid") and v["outline"].get("points_cr")
        }


def upload(orthanc: str, files: Sequence[Path]) -> None:
    """Store files in Orthanc through its REST API (what a modality's C-STORE amounts to here)."""
    with requests.Session() as s:
        for f in files:
            r = s.post(f"{orthanc}/instances", data=f.read_bytes(), timeout=60)
            assert r.status_code == 200, (f.name, r.status_code, r.text[:200])


def publish(source: Path, study_files: Sequence[Path], out: Path, orthanc: str) -> Published:
    """Analyse ``source`` (one series) with the real pipeline, then store the study and the outputs."""
    from dicomnode.pipeline.analyze import analyze_path

    run = analyze_path(source, out)
    if run.result.status.value != "ok" or run.outputs is None or run.outputs.sr is None:
        pytest.skip(f"analysis of {source.name} did not succeed ({run.result.reason}): no SR to show")
    upload(orthanc, [*study_files, run.outputs.sr, *run.outputs.sc])
    sr = pydicom.dcmread(run.outputs.sr, stop_before_pixels=True)
    scs = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in run.outputs.sc),
        key=lambda d: int(d.InstanceNumber),
    )
    assert len({d.SeriesInstanceUID for d in scs}) == 1
    return Published(
        study_uid=str(sr.StudyInstanceUID),
        result=json.loads(run.outputs.result_json.read_text()),
        sr_series_uid=str(sr.SeriesInstanceUID),
        sc_series_uid=str(scs[0].SeriesInstanceUID),
        sc_sop_uids=tuple(str(d.SOPInstanceUID) for d in scs),
    )


# -- the browser ------------------------------------------------------------------------------------------


@dataclass
class Console:
    """Errors the page reported: uncaught exceptions and console.error messages."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on(
            "console", lambda m: self.errors.append(f"console.error: {m.text}") if m.type == "error" else None
        )


@contextmanager
def browser_context() -> Iterator[Any]:
    """A Chromium context (1440x900) in which OHIF's first-visit tour is already marked as seen."""
    sync_playwright = require_viewer()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            # OHIF stores the tours a user has seen in localStorage; the tour's modal would cover the page
            context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            yield context
        finally:
            browser.close()


_ACTIVE_VIEWPORT = """() => {
  const vid = window.services.viewportGridService.getState().activeViewportId;
  return window.services.cornerstoneViewportService.getCornerstoneViewport(vid);
}"""


class Viewer:
    """One OHIF page showing one study."""

    def __init__(self, page: Any, base_url: str, study_uid: str) -> None:
        self.page = page
        self.page.set_default_timeout(60_000)
        page.goto(f"{base_url}/viewer?StudyInstanceUIDs={study_uid}")
        page.wait_for_function(
            "() => window.services && window.services.displaySetService.getActiveDisplaySets().length > 0"
        )

    def _js(self, body: str, arg: Any = None) -> Any:
        return self.page.evaluate(body, arg)

    def display_sets(self) -> list[dict[str, Any]]:
        return list(
            self._js(
                """() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
                     uid: d.displaySetInstanceUID, series: d.SeriesInstanceUID, modality: d.Modality,
                     description: d.SeriesDescription,
                     instances: (d.images || d.instances || [])
                       .map(i => [i.SOPInstanceUID, Number(i.InstanceNumber)])
                   }))"""
            )
        )

    def open_series(self, series_uid: str) -> None:
        """Double-click the series' thumbnail (what a reader does), then wait for its first image."""
        ds = next(d for d in self.display_sets() if d["series"] == series_uid)
        self.page.locator(f'[id="thumbnail-{ds["uid"]}"]').first.dblclick()
        self.page.wait_for_function(
            f"() => {{ const vp = ({_ACTIVE_VIEWPORT})(); return vp && vp.getCurrentImageId(); }}"
        )

    def sr_measurements(self, sr_series_uid: str) -> list[dict[str, Any]]:
        """The SR display set's measurements once every one of them is placed on an image."""
        find = (
            "window.services.displaySetService.getActiveDisplaySets()"
            f".find(d => d.SeriesInstanceUID === '{sr_series_uid}')"
        )
        self.page.wait_for_function(
            f"() => {{ const sr = {find}; return sr && sr.isLoaded && sr.measurements.length > 0 "
            "&& sr.measurements.every(m => m.loaded); }"
        )
        return list(
            self._js(
                f"""() => {find}.measurements.map(m => ({{
                      uid: m.TrackingUniqueIdentifier, id: m.TrackingIdentifier, imageId: m.imageId,
                      sop: m.ReferencedSOPInstanceUID, labels: m.labels }}))"""
            )
        )

    def show_image(self, image_id: str) -> None:
        """Bring an image into the active viewport, as the viewport's measurement arrows do."""
        self._js(
            f"(imageId) => {{ const vp = ({_ACTIVE_VIEWPORT})(); "
            "vp.setViewReference({ referencedImageId: imageId }); vp.render(); }",
            image_id,
        )
        self.page.wait_for_function(
            f"(imageId) => ({_ACTIVE_VIEWPORT})().getCurrentImageId() === imageId", arg=image_id
        )
        time.sleep(0.5)  # the SVG annotation layer is drawn on the next animation frames

    def show_index(self, index: int) -> str:
        """Show image ``index`` of the active stack; return its image id."""
        self._js(f"(i) => {{ const vp = ({_ACTIVE_VIEWPORT})(); vp.setImageIdIndex(i); }}", index)
        self.page.wait_for_function(
            f"(i) => ({_ACTIVE_VIEWPORT})().getCurrentImageIdIndex() === i", arg=index
        )
        time.sleep(0.5)
        return str(self._js(f"() => ({_ACTIVE_VIEWPORT})().getCurrentImageId()"))

    def current_image_id(self) -> str:
        return str(self._js(f"() => ({_ACTIVE_VIEWPORT})().getCurrentImageId()"))

    def drawn(self, annotation_uid: str, expect_text: str) -> dict[str, Any]:
        """What the SVG layer of the viewport shows: the text of one annotation and the outlines drawn.

        Waits (up to the page timeout) until the annotation's text contains ``expect_text`` and an outline is
        drawn: the SVG layer is updated on the animation frames after an image is shown.
        """
        # on a time-out, report what is there instead: the assertion in the test says what is missing
        with contextlib.suppress(Exception):
            self.page.wait_for_function(
                """([uid, text]) => Array.from(document.querySelectorAll(`g[data-annotation-uid="${uid}"]`))
                     .some(g => g.textContent.includes(text))
                   && document.querySelectorAll('svg.svg-layer polyline').length > 0""",
                arg=[annotation_uid, expect_text],
                timeout=20_000,
            )
        return dict(
            self._js(
                """(uid) => {
                  const text = Array.from(document.querySelectorAll(`g[data-annotation-uid="${uid}"]`))
                    .map(g => g.textContent).join(' ');
                  const lines = Array.from(document.querySelectorAll('svg.svg-layer polyline'))
                    .map(p => (p.getAttribute('points') || '').trim().split(/[\\s,]+/))
                    .map(nums => nums.filter(Boolean).length / 2);
                  return { text, polylines: lines };
                }""",
                annotation_uid,
            )
        )

    def annotation_images(self) -> dict[str, str]:
        """Annotation uid -> referenced image id, of every annotation cornerstone holds."""
        return dict(
            self._js(
                """() => Object.fromEntries(window.cornerstoneTools.annotation.state.getAllAnnotations()
                     .filter(a => a.metadata && a.metadata.referencedImageId)
                     .map(a => [a.annotationUID, a.metadata.referencedImageId]))"""
            )
        )

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def viewport_screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.locator('[data-cy^="viewport-pane"]').first.screenshot(path=str(path))
        return path
