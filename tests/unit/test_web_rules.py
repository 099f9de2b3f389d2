"""The rules service: where the rules in force come from, validation messages located, versions, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_testing import make_settings, make_store

from dicomnode.domain import SeriesSummary
from dicomnode.errors import ConfigError, RuleProblem, RulesError
from dicomnode.pipeline.rules_in_force import parse_rules_text
from dicomnode.routing import default_rules_text
from dicomnode.web.rules import RulesService, problems_of


def test_rule_errors_carry_rule_condition_field_as_data() -> None:
    """Every problem is located by the validator itself; nothing is parsed back from the message."""
    text = default_rules_text().replace("attribute: BodyPartExamined\n", "attribute: BodyPartExamine\n")
    with pytest.raises(RulesError) as exc:
        parse_rules_text(text)
    (p,) = exc.value.problems
    assert (p.rule, p.condition, p.field) == ("abdominal-ct-bmd", 7, "attribute")
    assert "did you mean 'BodyPartExamined'" in p.message and p.message in str(exc.value)
    bad = "rules:\n  - name: abd\n    action: analyse\n    conditions:\n"
    bad += "      - {attribute: SliceThickness, range: {max: thin}}\n  - {action: bad}\n"
    with pytest.raises(RulesError) as exc:
        parse_rules_text(bad)
    located = {(p.rule, p.condition, p.field) for p in exc.value.problems}
    assert ("abd", 1, "range.max") in located and ("2", None, "action") in located
    with pytest.raises(RulesError) as exc:
        parse_rules_text("rules:\n  - name: [unclosed\n")
    assert exc.value.problems[0].line is not None and "invalid YAML" in str(exc.value)
    with pytest.raises(RulesError) as exc:
        parse_rules_text("mode: sometimes\nrules: []\n")
    (m,) = exc.value.problems
    assert m.field == "mode" and m.rule is None
    assert problems_of(ConfigError("http.port: not a port")) == [RuleProblem("http.port: not a port")]


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
    assert (
        cur.source == "my-rules.yaml" and cur.rules.fallback.action == "analyze"
    )  # the older spelling, read as today's
    s = SeriesSummary("1.2", "1.2.3", {"Modality": "CT"}, 40)
    (d,) = service.select([s])
    assert d.action == "analyze" and d.destinations == ("pacs",)
