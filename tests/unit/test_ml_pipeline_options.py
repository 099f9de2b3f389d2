"""The node's analysis options: configured choices -> ``AnalysisOptions`` -> ``BmdOptions`` and the jobs."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import dicomnode
from dicomnode.config import AnalysisSettings, load_settings
from dicomnode.errors import ConfigError, NotQualifyingError
from dicomnode.imaging.volume import Volume
from dicomnode.pipeline.measure import (
    AnalysisOptions,
    check_options,
    make_measure,
    options_from_settings,
    resolve_options,
)


def test_defaults_are_the_built_in_methods() -> None:
    opts = resolve_options()
    assert opts == AnalysisOptions()
    assert (opts.segmentation, opts.bmd_estimator) == ("classical", "roi")
    assert opts.bundles() == [] and check_options(opts) == []


def test_estimator_and_segmentation_choices() -> None:
    opts = resolve_options("classical", "bundle:models/seg", "both:models/vbmd")
    assert opts.segmentation == "bundle:models/seg" and opts.bmd_estimator == "both:models/vbmd"
    assert [(role, str(p)) for role, _, p in opts.bundles()] == [
        ("segmentation", str(Path("models/seg"))),
        ("bmd", str(Path("models/vbmd"))),
    ]
    assert resolve_options(bmd_estimator="bundle:x").bmd_estimator == "bundle:x"
    assert resolve_options(bmd_estimator="roi").bmd_estimator == "roi"


@pytest.mark.parametrize(
    "kw",
    [
        {"backend": "magic"},
        {"segmentation_backend": "both:x"},
        {"segmentation_backend": "bundle:"},
        {"bmd_estimator": "median"},
        {"contrast_policy": "ignore"},
    ],
)
def test_unknown_choices_are_one_line_config_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_options(**kw)
    assert "\n" not in str(exc.value)


def test_erosion_default_is_one_value() -> None:
    """Settings, the pipeline and the measurement engine share one erosion default."""
    bmd = pytest.importorskip("dicomnode.bmd")
    assert AnalysisSettings().erosion_mm == dicomnode.DEFAULT_EROSION_MM
    assert AnalysisOptions().erosion_mm == dicomnode.DEFAULT_EROSION_MM
    assert bmd.BmdOptions().erosion_mm == dicomnode.DEFAULT_EROSION_MM


def test_settings_reach_the_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """erosion_mm, contrast_policy and the backend in the config are what ``analyze_volume`` gets."""
    bmd = pytest.importorskip("dicomnode.bmd")
    cfg = tmp_path / "node.yaml"
    analysis = {"erosion_mm": 2.5, "contrast_policy": "abstain", "disclaimer": "research only"}
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d"), "analysis": analysis}))
    opts = options_from_settings(load_settings(cfg, environ={}))
    assert (opts.erosion_mm, opts.contrast_policy, opts.disclaimer) == (2.5, "abstain", "research only")

    seen: list[Any] = []

    def fake(volume: Volume, options: Any = None) -> Any:
        seen.append(options)
        raise NotQualifyingError("stop here")

    monkeypatch.setattr(bmd, "analyze_volume", fake)
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(NotQualifyingError):
        make_measure(opts)(vol)
    assert seen[0].erosion_mm == 2.5 and seen[0].contrast_correction == "abstain"
    assert seen[0].backend == "classical"


def test_job_function_carries_the_options_to_worker_processes() -> None:
    from dicomnode.pipeline.executors import analyze_job, job_function

    assert job_function(None) is analyze_job
    fn = job_function(AnalysisOptions(erosion_mm=3.0, bmd_estimator="both:b"))
    back = pickle.loads(pickle.dumps(fn))  # the process pool pickles it
    assert back.keywords["options"] == AnalysisOptions(erosion_mm=3.0, bmd_estimator="both:b")


def test_analyze_cli_options_from_config_and_flags(tmp_path: Path) -> None:
    from dicomnode.cli.analyze import options_from_args

    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d"), "analysis": {"erosion_mm": 3.0}}))
    ns = argparse.Namespace(config=cfg, backend=None, segmentation_backend=None, bmd_estimator=None)
    assert options_from_args(ns).erosion_mm == 3.0
    ns.bmd_estimator = "roi"
    assert options_from_args(ns).bmd_estimator == "roi"
    ns.bmd_estimator = f"both:{tmp_path / 'missing'}"
    with pytest.raises(dicomnode.errors.DicomnodeError) as exc:
        options_from_args(ns)
    assert "missing" in str(exc.value) and "\n" not in str(exc.value)
