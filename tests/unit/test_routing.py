"""Routing rules: validation, every operator, first/all match, fallback, ranking, explanations, defaults."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from dicomnode.cli import main
from dicomnode.domain import RuleDecision, SeriesSummary
from dicomnode.errors import ConfigError
from dicomnode.routing import (
    Condition,
    default_rules,
    default_rules_text,
    evaluate_condition,
    explain,
    is_native,
    is_sharp_kernel,
    load_rules,
    select,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def series(
    uid: str, study: str = "1.9", n: int = 120, z: float | None = 360.0, **attrs: Any
) -> SeriesSummary:
    base: dict[str, Any] = {
        "Modality": "CT",
        "SOPClassUID": CT_IMAGE,
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "SliceThickness": 3.0,
        "ConvolutionKernel": "STANDARD",
        "BodyPartExamined": "ABDOMEN",
        "SeriesDescription": "ABD 3.0",
    }
    base.update(attrs)
    base = {k: v for k, v in base.items() if v is not None}
    return SeriesSummary(study, uid, base, n, z)


def cond(**kw: Any) -> Condition:
    return Condition.model_validate(kw)


def passes(c: Condition, s: SeriesSummary) -> bool:
    return evaluate_condition(c, s).passed


# -- operators ----------------------------------------------------------------------------------------


def test_equals_is_case_insensitive_by_default_and_numeric_aware() -> None:
    s = series("1", Modality="ct", SliceThickness="3.0")
    assert passes(cond(attribute="Modality", equals="CT"), s)
    assert not passes(cond(attribute="Modality", equals="CT", case_sensitive=True), s)
    assert passes(cond(attribute="SliceThickness", equals=3), s)
    assert not passes(cond(attribute="SliceThickness", equals=2.5), s)
    # multi-valued: the joined value
    assert passes(cond(attribute="ImageType", equals="ORIGINAL\\PRIMARY\\AXIAL"), s)
    assert not passes(cond(attribute="ImageType", equals="ORIGINAL"), s)


def test_one_of_matches_any_value_of_a_multi_valued_attribute() -> None:
    s = series("1", ImageType=("DERIVED", "SECONDARY", "DOSE_INFO"))
    assert passes(cond(attribute="ImageType", one_of=["DOSE_INFO", "X"]), s)
    assert not passes(cond(attribute="ImageType", one_of=["AXIAL", "LOCALIZER"]), s)
    assert passes(cond(attribute="Modality", one_of=["MR", "CT"]), s)


def test_contains_needs_every_listed_value() -> None:
    s = series("1")
    assert passes(cond(attribute="ImageType", contains=["ORIGINAL", "axial"]), s)
    assert passes(cond(attribute="ImageType", contains="PRIMARY"), s)
    assert not passes(cond(attribute="ImageType", contains=["ORIGINAL", "LOCALIZER"]), s)


def test_regex_searches_the_value() -> None:
    s = series("1", SeriesDescription="Abdomen 3.0 B30f")
    assert passes(cond(attribute="SeriesDescription", regex=r"\bB3\d"), s)
    assert passes(cond(attribute="SeriesDescription", regex="abdomen"), s)
    assert not passes(cond(attribute="SeriesDescription", regex="abdomen", case_sensitive=True), s)
    assert not passes(cond(attribute="SeriesDescription", regex="^3.0"), s)


def test_range_is_inclusive_and_numeric() -> None:
    assert passes(cond(attribute="SliceThickness", range={"max": 3}), series("1", SliceThickness=3.0))
    assert not passes(cond(attribute="SliceThickness", range={"max": 3}), series("1", SliceThickness="3.5"))
    assert passes(cond(attribute="SliceThickness", range={"min": 1, "max": 5}), series("1", SliceThickness=1))
    assert not passes(cond(attribute="SliceThickness", range={"min": 1}), series("1", SliceThickness="n/a"))
    assert passes(cond(attribute="derived.images", range={"min": 30}), series("1", n=30))
    assert not passes(cond(attribute="derived.images", range={"min": 30}), series("1", n=29))
    # enhanced CT: one instance, many frames
    assert passes(cond(attribute="derived.images", range={"min": 30}), series("1", n=1, NumberOfFrames=200))
    assert passes(cond(attribute="derived.z_extent_mm", range={"min": 100}), series("1", z=250.0))
    assert not passes(cond(attribute="derived.z_extent_mm", range={"min": 100}), series("1", z=None))


def test_present_and_absent_attributes() -> None:
    s = series("1", ContrastBolusAgent="")
    assert not passes(cond(attribute="ContrastBolusAgent", present=True), s)  # empty counts as absent
    assert passes(cond(attribute="ContrastBolusAgent", present=False), s)
    assert passes(cond(attribute="BodyPartExamined", present=True), s)
    # an absent attribute fails every other operator, so a negated test holds on it
    s2 = series("2", BodyPartExamined=None)
    assert not passes(cond(attribute="BodyPartExamined", one_of=["HEAD"]), s2)
    assert passes(cond(attribute="BodyPartExamined", one_of=["HEAD"], **{"not": True}), s2)


def test_not_negates_and_is_explained() -> None:
    c = cond(attribute="ImageType", contains="LOCALIZER", **{"not": True})
    loc = series("1", ImageType=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    res = evaluate_condition(c, loc)
    assert not res.passed
    assert res.reason("r") == "r: not (ImageType contains LOCALIZER): FAIL (ORIGINAL\\PRIMARY\\LOCALIZER)"
    assert passes(c, series("2"))


# -- validation ---------------------------------------------------------------------------------------


def _rules(body: str) -> str:
    return "mode: first_match\nrules:\n" + body


def _one(name: str, *conditions: str) -> str:
    """A one-rule file whose rule has the given flow-style conditions."""
    conds = "".join(f"      - {c}\n" for c in conditions)
    return _rules(f"  - name: {name}\n    action: analyze\n    conditions:\n{conds}")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            _one("ct", "{attribute: Modalty, equals: CT}"),
            "rule 'ct' condition 1: unknown DICOM keyword 'Modalty' (did you mean 'Modality'?)",
        ),
        (
            _one("ct", "{attribute: Modality, equals: CT}", "{attribute: Modality, equals: CT, regex: C}"),
            "rule 'ct' condition 2: give exactly one of",
        ),
        (
            _rules("  - name: ct\n    action: analyze\n    conditions:\n      - {attribute: Modality}\n"),
            "rule 'ct' condition 1: give exactly one of",
        ),
        (
            _one("ct", "{attribute: Modality, regex: '('}"),
            "invalid regex",
        ),
        (
            _rules(
                "  - name: ct\n    action: analyze\n    conditions:\n      - {attribute: Modality, eq: CT}\n"
            ),
            "rule 'ct' condition 1: eq: unknown field",
        ),
        (
            _rules("  - name: x\n    action: analyze\n  - name: x\n    action: ignore\n"),
            "rule names must be unique, repeated: x",
        ),
        (
            _rules("  - name: x\n    action: delete\n"),
            "rule 'x': action: Input should be 'analyze' or 'ignore'",
        ),
        (
            _rules("  - name: x\n    action: ignore\n    pipeline: bmd\n"),
            "an 'ignore' rule takes no pipeline",
        ),
        (
            _one("x", "{attribute: PatientSex, equals: NO}"),
            "quote the value",
        ),
        (
            _one("x", "{attribute: SliceThickness, range: {}}"),
            "range needs min, max or both",
        ),
        ("mode: sometimes\nrules: []\n", "mode: Input should be 'first_match' or 'all_match'"),
        ("rules: [\n", "invalid YAML"),
        ("- just a list\n", "must hold a mapping"),
    ],
)
def test_invalid_rules_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_rules(text)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_destinations_are_checked_against_config() -> None:
    text = _rules("  - name: ct\n    action: analyze\n    destinations: [pacs, nowhere]\n")
    rs = load_rules(text)  # no config given: not checked
    assert rs.rules[0].destinations == ["pacs", "nowhere"]
    with pytest.raises(ConfigError, match="rule 'ct': unknown destination 'nowhere' \\(configured: pacs\\)"):
        load_rules(text, destinations=["pacs"])


def test_load_rules_from_file_and_default_pipeline(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        _rules("  - name: ct\n    action: analyze\n    conditions: [{attribute: Modality, equals: CT}]\n")
    )
    rs = load_rules(f)
    assert rs.source == str(f)
    assert rs.rules[0].pipeline == "bmd"
    assert load_rules(str(f)).rules == rs.rules
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


# -- matching modes and fallback ----------------------------------------------------------------------

MODES = """
mode: {mode}
fallback: {fallback}
rules:
  - name: skip-thick
    action: ignore
    conditions: [{{attribute: SliceThickness, range: {{min: 6}}}}]
  - name: ct
    action: analyze
    pipeline: bmd
    destinations: [pacs]
    select: all
    conditions: [{{attribute: Modality, equals: CT}}]
  - name: any-ct-archive
    action: analyze
    pipeline: research
    destinations: [archive]
    select: all
    conditions: [{{attribute: Modality, one_of: [CT, PT]}}]
"""


def test_first_match_takes_the_first_rule_and_says_why_earlier_ones_failed() -> None:
    rs = load_rules(MODES.format(mode="first_match", fallback="{action: ignore}"))
    thin, thick, mr = series("1"), series("2", SliceThickness=8.0), series("3", Modality="MR")
    d = {x.series_instance_uid: x for x in select([thin, thick, mr], rs)}
    assert (d["1"].rule, d["1"].action, d["1"].selected, d["1"].destinations) == (
        "ct",
        "analyze",
        True,
        ("pacs",),
    )
    assert "rule 'skip-thick' not matched" in d["1"].reasons
    assert any("SliceThickness >= 6: FAIL (3.0)" in r for r in d["1"].reasons)
    assert (d["2"].rule, d["2"].action, d["2"].selected) == ("skip-thick", "ignore", False)
    assert (d["3"].rule, d["3"].action, d["3"].selected) == (None, "ignore", False)
    assert d["3"].reasons[-1] == "no rule matched: fallback ignore"
    assert any("ct: Modality equals CT: FAIL (MR)" in r for r in d["3"].reasons)


def test_all_match_yields_one_decision_per_matching_rule() -> None:
    rs = load_rules(MODES.format(mode="all_match", fallback="{action: ignore}"))
    out = select([series("1")], rs)
    assert [(d.rule, d.pipeline, d.destinations, d.selected) for d in out] == [
        ("ct", "bmd", ("pacs",), True),
        ("any-ct-archive", "research", ("archive",), True),
    ]


def test_fallback_analyze_and_empty_destinations_mean_all() -> None:
    rs = load_rules(MODES.format(mode="first_match", fallback="{action: analyze}"))
    (d,) = select([series("9", Modality="MR")], rs, all_destinations=["pacs", "archive"])
    assert (d.rule, d.action, d.pipeline, d.selected, d.destinations) == (
        None,
        "analyze",
        "bmd",
        True,
        ("pacs", "archive"),
    )


# -- ranking ------------------------------------------------------------------------------------------


def _study_candidates() -> list[SeriesSummary]:
    return [
        series("1.9.1", SliceThickness=5.0, ConvolutionKernel="BONE", SeriesDescription="ABD BONE 5mm"),
        series("1.9.2", ImageType=("ORIGINAL", "PRIMARY", "LOCALIZER"), n=1, z=0.0, SliceThickness=1.0),
        series("1.9.3", SliceThickness=3.0, ConvolutionKernel="B30f", SeriesDescription="ABD 3mm soft"),
    ]


ACCEPT_ALL = (
    "rules:\n  - name: ct\n    action: analyze\n    conditions: [{attribute: Modality, equals: CT}]\n"
)


def test_ranking_picks_the_thin_soft_series_over_bone_kernel_and_localizer() -> None:
    decisions = select(_study_candidates(), load_rules(ACCEPT_ALL))
    by = {d.series_instance_uid: d for d in decisions}
    assert [uid for uid, d in by.items() if d.selected] == ["1.9.3"]
    assert (by["1.9.3"].rank, by["1.9.1"].rank, by["1.9.2"].rank) == (1, 2, 3)
    assert any(r.startswith("ranking: 1 of 3 in study (best)") for r in by["1.9.3"].reasons)
    assert any("1.9.3 ranks higher (it has a soft kernel)" in r for r in by["1.9.1"].reasons)
    assert any("1.9.3 ranks higher (it is ORIGINAL/PRIMARY/AXIAL)" in r for r in by["1.9.2"].reasons)
    # the order of the input does not matter
    shuffled = select(list(reversed(_study_candidates())), load_rules(ACCEPT_ALL))
    assert [d.series_instance_uid for d in shuffled if d.selected] == ["1.9.3"]


def test_ranking_prefers_native_then_thinner_and_needs_lumbar_coverage() -> None:
    native = series("a", SliceThickness=3.0)
    contrast = series("b", SliceThickness=1.0, ContrastBolusAgent="APPLIED")
    short = series("c", SliceThickness=0.6, z=40.0)
    thinner_native = series("d", SliceThickness=2.0)
    d = select([native, contrast, short, thinner_native], load_rules(ACCEPT_ALL))
    ranks = {x.series_instance_uid: x.rank for x in d}
    assert ranks == {"d": 1, "a": 2, "b": 3, "c": 4}
    reasons = {x.series_instance_uid: " ".join(x.reasons) for x in d}
    assert "thinner slices (2 mm vs 3 mm)" in reasons["a"]
    assert "it is native (no contrast agent)" in reasons["b"]
    assert "it covers the lumbar spine" in reasons["c"]


def test_exactly_one_selected_per_study_and_select_all() -> None:
    candidates = [
        series(f"s{k}.{i}", study=f"st{k}", SliceThickness=1.0 + i) for k in range(3) for i in range(3)
    ]
    d = select(candidates, load_rules(ACCEPT_ALL))
    chosen = sorted(x.series_instance_uid for x in d if x.selected)
    assert chosen == ["s0.0", "s1.0", "s2.0"]
    every = load_rules(ACCEPT_ALL + "    select: all\n")
    assert all(x.selected for x in select(candidates, every))


def test_ranking_uses_the_vocabulary_kernel_and_contrast_tests() -> None:
    """The facts themselves are tested once, in test_vocab.py; here only that ranking uses them."""
    assert is_sharp_kernel("B70f") and not is_sharp_kernel(("Br38f", "3"))
    assert is_native(None) and is_native("NONE") and not is_native("ISOVUE300/100")


# -- explanation --------------------------------------------------------------------------------------


def test_explain_prints_a_table_and_every_reason() -> None:
    cands = _study_candidates()
    text = explain(select(cands, load_rules(ACCEPT_ALL)), cands)
    lines = text.splitlines()
    assert lines[0].split() == [
        "SERIES",
        "DESCRIPTION",
        "MOD",
        "IMAGES",
        "RULE",
        "ACTION",
        "SELECTED",
        "RANK",
    ]
    row = next(line for line in lines[1:4] if line.startswith("1.9.3"))
    assert row.split()[-3:] == ["analyze", "yes", "1"]
    assert "1.9.1: not selected (analyze, rule ct)" in text
    assert "  - ct: Modality equals CT: pass (CT)" in text
    brief = explain(select(cands, load_rules(ACCEPT_ALL)), cands, verbose=False)
    assert len(brief.splitlines()) == 4


def test_decisions_carry_reasons() -> None:
    for d in select(_study_candidates(), default_rules()):
        assert isinstance(d, RuleDecision)
        assert d.reasons, d


# -- the shipped rules --------------------------------------------------------------------------------


def test_default_rules_select_an_abdominal_ct() -> None:
    rs = default_rules()
    assert rs.source == "default" and "abdominal-ct-bmd" in [r.name for r in rs.rules]
    assert "abdominal-ct-bmd" in default_rules_text()
    ok = series("1", ConvolutionKernel=("Br38f", "3"), SeriesDescription="Abdomen 3.0 Br38")
    enhanced = series(
        "2",
        n=1,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1",
        ImageType=("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
        NumberOfFrames=300,
    )
    d = select([ok], rs)[0]
    assert (d.selected, d.rule, d.pipeline) == (True, "abdominal-ct-bmd", "bmd")
    d2 = select([enhanced], rs)[0]
    assert (d2.selected, d2.rule) == (True, "abdominal-ct-bmd")


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"Modality": "MR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, "Modality equals CT: FAIL (MR)"),
        ({"ImageType": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "not (ImageType one of LOCALIZER): FAIL"),
        (
            {"ImageType": ("DERIVED", "SECONDARY", "DOSE_INFO")},
            "rule 'derived-secondary-or-dose' matched: ignore",
        ),
        ({"BodyPartExamined": "HEAD"}, "FAIL (HEAD)"),
        ({"SeriesDescription": "Knee Arthroplasty", "BodyPartExamined": None}, "FAIL (Knee Arthroplasty)"),
        ({"SliceThickness": 8.0}, "derived.slice_mm <= 5: FAIL (8.0)"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOPClassUID one of"),
    ],
)
def test_default_rules_reject_with_reasons(attrs: dict[str, Any], expected: str) -> None:
    (d,) = select([series("x", **attrs)], default_rules())
    assert not d.selected
    assert any(expected in r for r in d.reasons), d.reasons


# -- issue 9 item 7: qualification for real protocols -------------------------------------------------


@pytest.mark.parametrize(
    "attrs",
    [
        {"ImageType": ("DERIVED", "PRIMARY", "AXIAL")},  # Siemens primary reconstruction from raw data
        {"ImageType": ("DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI")},
        {"ImageType": ("ORIGINAL", "PRIMARY")},  # no value 3
        {"ConvolutionKernel": None, "Manufacturer": None},  # no vendor or kernel tags
        {
            "BodyPartExamined": "CHEST",
            "SeriesDescription": "Thorax 1.5 Br40",
        },  # L1 in view is the engine's call
        {"SliceThickness": None},  # no thickness in the header: the positions' spacing (360 mm / 119) counts
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2.2"},  # Legacy Converted Enhanced CT
    ],
    ids=[
        "derived-primary",
        "derived-primary-4",
        "no-value-3",
        "no-vendor-tags",
        "chest",
        "no-thickness",
        "legacy",
    ],
)
def test_default_rules_qualify_real_protocols(attrs: dict[str, Any]) -> None:
    (d,) = select([series("x", **attrs)], default_rules())
    assert d.selected and d.rule == "abdominal-ct-bmd", d.reasons


@pytest.mark.parametrize(
    "image_type",
    [
        ("DERIVED", "SECONDARY", "AXIAL"),  # a reformat
        ("DERIVED", "SECONDARY", "MPR"),
        ("DERIVED", "PRIMARY", "MIP"),  # a MIP, even marked PRIMARY
        ("ORIGINAL", "PRIMARY", "LOCALIZER"),
        ("ORIGINAL", "SECONDARY", "AXIAL"),
    ],
)
def test_default_rules_refuse_secondary_reformats_and_mips(image_type: tuple[str, ...]) -> None:
    (d,) = select([series("x", ImageType=image_type)], default_rules())
    assert not d.selected and d.action == "ignore", d.reasons


def test_thin_geometry_without_thickness_and_thick_slices_by_geometry() -> None:
    (d,) = select([series("x", SliceThickness=None, n=40, z=240.0)], default_rules())  # 6.2 mm apart
    assert not d.selected and any("derived.slice_mm <= 5: FAIL (6.15" in r for r in d.reasons), d.reasons


def test_derived_primary_ranks_after_original() -> None:
    original = series("1.9.1", ImageType=("ORIGINAL", "PRIMARY", "AXIAL"), SliceThickness=3.0)
    derived = series("1.9.2", ImageType=("DERIVED", "PRIMARY", "AXIAL"), SliceThickness=1.0)  # thinner
    by = {d.series_instance_uid: d for d in select([derived, original], default_rules())}
    assert by["1.9.1"].selected and by["1.9.1"].rank == 1
    assert not by["1.9.2"].selected and by["1.9.2"].rank == 2
    assert any("ranks higher (it is ORIGINAL/PRIMARY/AXIAL)" in r for r in by["1.9.2"].reasons)
    # alone, the primary reconstruction is chosen and the explanation says what it is
    (alone,) = select([derived], default_rules())
    assert alone.selected and any(
        "DERIVED/PRIMARY/AXIAL (primary reconstruction)" in r for r in alone.reasons
    )
    text = explain([alone], [derived])
    assert "SELECTED" in text and "primary reconstruction" in text


def test_default_rules_reject_too_few_images() -> None:
    (d,) = select([series("x", n=12)], default_rules())
    assert not d.selected
    assert any("derived.images >= 30: FAIL (12)" in r for r in d.reasons)


def _scan(path: Path) -> list[SeriesSummary]:
    from dicomnode.cli.admin import summaries_from_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return summaries_from_path(path)


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("edge_and_negative/pydicom/MR_small.dcm", "Modality equals CT: FAIL (MR)"),
        (
            "edge_and_negative/orthanc/CT_chest_LOCALIZER_jpegLossless_1.2.840.10008.1.2.4.70.dcm",
            "not (ImageType one of LOCALIZER): FAIL",
        ),
        ("edge_and_negative/openrem/CT-SC-Philips_Brilliance16P.dcm", "DERIVED\\SECONDARY\\DOSE_INFO"),
        ("edge_and_negative/pydicom/head_ct_series_16x16", "FAIL (HEAD)"),
        ("edge_and_negative/orthanc/Issue124_CT_knee.dcm", "Knee"),
    ],
)
def test_default_rules_on_real_edge_files(shared_data: Path, rel: str, expected: str) -> None:
    summaries = _scan(shared_data / rel)
    assert len(summaries) == 1
    (d,) = select(summaries, default_rules())
    assert not d.selected and d.action == "ignore"
    assert any(expected in r for r in d.reasons), d.reasons


def test_real_petct_series_is_refused_only_for_its_length(shared_data: Path) -> None:
    # A genuine axial CT (SOP class only in the file meta): everything passes but the 20-image length.
    (d,) = select(_scan(shared_data / "totalsegmentator_petct_dicom" / "dicom"), default_rules())
    assert not d.selected
    failures = [r for r in d.reasons if "abdominal-ct-bmd:" in r and ": FAIL" in r]
    assert failures == ["abdominal-ct-bmd: derived.images >= 30: FAIL (20)"]


def test_cli_rules_explain_on_a_folder(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(
            ["rules", "explain", str(shared_data / "edge_and_negative" / "pydicom" / "head_ct_series_16x16")]
        )
    out = capsys.readouterr().out
    assert rc == 0
    assert "rules: default (first_match); 1 series" in out
    assert "not selected (ignore, rule (fallback))" in out


def test_cli_rules_explain_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        _rules("  - name: ct\n    action: analyze\n    conditions: [{attribute: Bogus, equals: 1}]\n")
    )
    assert main(["rules", "explain", str(tmp_path), "--rules", str(bad)]) == 2
    assert "unknown DICOM keyword 'Bogus'" in capsys.readouterr().err
    assert main(["rules", "explain", "not-a-path-or-uid"]) == 1
    assert "neither an existing path nor a StudyInstanceUID" in capsys.readouterr().err
    assert main(["rules", "default"]) == 0
    assert load_rules(capsys.readouterr().out).rules == default_rules().rules


def test_cli_rules_explain_a_received_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from dicomnode.store import Store, make_engine, upgrade

    cfg = tmp_path / "node.yaml"
    cfg.write_text("data_dir: data\n")
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'dicomnode.sqlite3'}")
    upgrade(engine)
    store = Store(engine)
    kernels = {"1.5.1": "BONE", "1.5.2": "STANDARD"}
    for uid, kernel in kernels.items():
        for i in range(40):
            store.record_instance(
                study_uid="1.5",
                series_uid=uid,
                sop_instance_uid=f"{uid}.{i}",
                sop_class_uid=CT_IMAGE,
                transfer_syntax="1.2.840.10008.1.2.1",
                path=f"spool/{uid}/{i}.dcm",
                size_bytes=1,
                study_attrs={"StudyDescription": "CT ABDOMEN"},
                series_attrs={
                    "Modality": "CT",
                    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                    "SliceThickness": 3.0,
                    "ConvolutionKernel": kernel,
                },
                calling_aet="PACS",
                source="dimse",
                slice_position=3.0 * i,
                now=datetime(2026, 1, 1, tzinfo=UTC),
            )
    engine.dispose()
    assert main(["rules", "explain", "1.5", "--config", str(cfg), "--brief"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["1.5.2"][-2:] == ["yes", "1"]
    assert rows["1.5.1"][-2:] == ["no", "2"]
    assert main(["rules", "explain", "1.6", "--config", str(cfg)]) == 1
    assert "study 1.6 is not in the database" in capsys.readouterr().err
