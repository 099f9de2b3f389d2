"""The one vocabulary (``dicomnode.vocab``): one test per fact, and the modules that need it use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from dicomnode.domain import BoneCategory
from dicomnode.vocab import (
    ANALYZE,
    CT_IMAGE_STORAGE_SOP_CLASSES,
    MULTIFRAME_CT_SOP_CLASSES,
    acr_category,
    contrast_agent_given,
    is_sharp_kernel,
    rule_action,
)

PKG = Path(__file__).resolve().parents[2] / "dicomnode"


def test_ct_storage_sop_classes() -> None:
    assert {
        str(CTImageStorage),
        str(EnhancedCTImageStorage),
        str(LegacyConvertedEnhancedCTImageStorage),
    } == CT_IMAGE_STORAGE_SOP_CLASSES
    assert CT_IMAGE_STORAGE_SOP_CLASSES - {str(CTImageStorage)} == MULTIFRAME_CT_SOP_CLASSES


@pytest.mark.parametrize(
    ("kernel", "sharp"),
    [
        *[(k, True) for k in ("BONE", "BONEPLUS", "LUNG", "B70f", "B50f", "Br64", "Bl57", "I70f", "FC30")],
        *[(k, True) for k in ("FC52", "D", "YC", "EDGE", ("Br64d", "3"))],
        *[(k, False) for k in ("STANDARD", "SOFT", "B30f", "B41s", "Br38f", "Br40", "FC08", "B", "C")],
        *[(k, False) for k in ("I31f", ("Br38f", "3"), None, "")],
    ],
)
def test_sharp_kernel(kernel: object, sharp: bool) -> None:
    assert is_sharp_kernel(kernel) is sharp


def test_acr_category() -> None:
    assert acr_category(120.1) is BoneCategory.NORMAL
    assert acr_category(120.0) is BoneCategory.OSTEOPENIA  # the cut-offs themselves are osteopenia
    assert acr_category(80.0) is BoneCategory.OSTEOPENIA
    assert acr_category(79.9) is BoneCategory.OSTEOPOROSIS


def test_contrast_agent_given() -> None:
    assert contrast_agent_given(None) is None and contrast_agent_given("") is None
    for none in ("NONE", "no", "N", "-", "without", ("NONE", "")):
        assert contrast_agent_given(none) is False, none
    for agent in ("APPLIED", "ISOVUE300/100", "IODINATED CONTRAST", ("NONE", "IOMEPROL")):
        assert contrast_agent_given(agent) is True, agent


def _defines(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            out.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.extend(t.id for t in targets if isinstance(t, ast.Name) and t.id in names)
    return out


def test_each_fact_is_defined_once() -> None:
    """No other module defines its own kernel test, ACR category, no-contrast list or CT SOP class set."""
    names = {
        "is_sharp_kernel",
        "_SHARP_KERNEL",
        "SHARP_KERNEL_PATTERNS",
        "acr_category",
        "category",
        "NO_CONTRAST_VALUES",
        "CT_SOP_CLASSES",
        "_CT_SOP_CLASSES",
        "CT_IMAGE_STORAGE",
    }
    offenders = [
        f"{p.relative_to(PKG.parent)}: {name}"
        for p in sorted(PKG.rglob("*.py"))
        if p.name != "vocab.py"
        for name in _defines(p, names)
    ]
    assert not offenders, offenders


def test_one_spelling_of_the_analyze_action() -> None:
    """``analyze`` (the CLI's spelling); rules and decisions of older versions say "analyse"."""
    assert ANALYZE == "analyze" and rule_action("analyse") == ANALYZE and rule_action("ignore") == "ignore"
    from dicomnode.routing import load_rules

    legacy = load_rules("rules:\n  - name: r\n    action: analyse\n")
    assert legacy.rules[0].action == ANALYZE and legacy.rules[0].pipeline == "bmd"
