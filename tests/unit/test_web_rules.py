"""The rules service: where the rules in force come from, validation messages located, versions, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_testing import make_settings, make_store

from dicomnode.domain import SeriesSummary
from dicomnode.errors import ConfigError
from dicomnode.routing import default_rules_text
from dicomnode.web.rules import RulesService, parse_problems


def test_parse_problems_locates_rule_condition_field() -> None:
    (p,) = parse_problems("rules: rule 'abd' condition 3: unknown DICOM keyword 'Foo' (did you mean 'Foo2'?)")
    assert (p.rule, p.condition, p.field) == ("abd", 3, None)
    a, b = parse_problems(
        "rules: rule 'abd' condition 1: range.max: Input should be a valid number; rule 2: action: bad"
    )
    assert (a.rule, a.condition, a.field) == ("abd", 1, "range.max")
    assert (b.rule, b.condition, b.field) == ("2", None, "action")
    (y,) = parse_problems("rules: invalid YAML (line 4, column 9): found unexpected end of stream")
    assert y.line == 4
    (m,) = parse_problems("rules: mode: Input should be 'first_match' or 'all_match'")
    assert m.field == "mode" and m.rule is None


@pytest.fixture
def service(tmp_path: Path) -> RulesService:
    settings = make_settings(tmp_path / "data")
    return RulesService(make_store(settings), settings)


def test_defaults_then_saved_versions(service: RulesService) -> None:
    cur = service.current()
    assert cur.version is None and cur.source == "default" and cur.text == default_rules_text()
    v1 = service.save("rules: []\nfallback: {action: ignore}\n", "alice", "none")
    assert service.current().version == v1 and service.current().rules.rules == []
    v2 = service.rollback(v1, "bob")  # rolling back writes a new version
    assert v2 > v1 and service.current().version == v2
    assert service.store.get_rule_version(v2).comment == f"roll back to version {v1}"
    assert "-mode: first_match" in service.diff(None, v1)
    assert service.diff(v1, v2) == ""
    actions = [e.action for e in service.store.list_audit().items]
    assert actions.count("rules.save") == 2


def test_unknown_destination_and_empty_text_are_problems(service: RulesService) -> None:
    text = "rules:\n  - name: r\n    action: analyse\n    destinations: [nowhere]\n    conditions: []\n"
    problems = service.validate(text)
    assert problems and "nowhere" in problems[0].message
    with pytest.raises(ConfigError):
        service.save(text, "alice")
    assert service.validate("   ") and service.validate("- just\n- a list\n")


def test_rules_file_is_the_base(tmp_path: Path) -> None:
    rules = tmp_path / "my-rules.yaml"
    rules.write_text("rules: []\nfallback: {action: analyse}\n")
    settings = make_settings(tmp_path / "data", rules_file=str(rules))
    service = RulesService(make_store(settings), settings)
    cur = service.current()
    assert cur.source == "my-rules.yaml" and cur.rules.fallback.action == "analyse"
    s = SeriesSummary("1.2", "1.2.3", {"Modality": "CT"}, 40)
    (d,) = service.select([s])
    assert d.action == "analyse" and d.destinations == ("pacs",)
