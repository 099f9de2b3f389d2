"""The routing rules' history, validation and dry runs (the Rules page and ``/api/rules``).

What is in force comes from the one rules provider of the node,
:class:`dicomnode.pipeline.rules_in_force.RulesInForce`, which the runner routes with too; this service
adds saving (audited), rollback, diffs and dry runs on top of it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from dicomnode import routing
from dicomnode.config import Settings
from dicomnode.domain import RuleDecision, SeriesSummary
from dicomnode.errors import ConfigError, RuleProblem, RulesError
from dicomnode.pipeline.rules_in_force import CurrentRules, RulesInForce
from dicomnode.routing import RuleSet
from dicomnode.store import Store

__all__ = ["CurrentRules", "RuleProblem", "RulesService", "explain_rows", "problems_of"]


def problems_of(exc: ConfigError) -> list[RuleProblem]:
    """The located problems of a rules error (one unlocated problem for any other configuration error)."""
    if isinstance(exc, RulesError):
        return list(exc.problems)
    return [RuleProblem(message=str(exc))]


def explain_rows(
    decisions: Sequence[RuleDecision], summaries: Sequence[SeriesSummary]
) -> list[dict[str, Any]]:
    """The JSON rows of ``POST /api/rules/explain``: one per decision, with the series' main headers."""
    by_uid = {s.series_instance_uid: s for s in summaries}
    rows = []
    for d in decisions:
        s = by_uid.get(d.series_instance_uid)
        rows.append(
            {
                "series_instance_uid": d.series_instance_uid,
                "selected": d.selected,
                "rule": d.rule,
                "action": d.action,
                "rank": d.rank,
                "destinations": list(d.destinations),
                "reasons": list(d.reasons),
                "series_description": str(s.get("SeriesDescription", "") or "") if s else "",
                "series_number": _plain(s.get("SeriesNumber")) if s else None,
                "images": s.n_instances if s else None,
                "slice_thickness": _plain(s.get("SliceThickness")) if s else None,
                "kernel": _plain(s.get("ConvolutionKernel")) if s else None,
            }
        )
    return rows


def _plain(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return "\\".join(str(x) for x in v)
    if v is None or isinstance(v, int | float | str):
        return v
    return str(v)


class RulesService:
    """Rules in force, versions, validation and dry runs, over the store.

    Parameters
    ----------
    store
        Holds the rule versions and the received series.
    settings
        ``rules_file`` (the fallback when no version was saved) and the destination names.
    provider
        The node's rules provider (the one the runner routes with); a new one over ``store`` when None.
    """

    def __init__(self, store: Store, settings: Settings, provider: RulesInForce | None = None) -> None:
        self.store = store
        self.settings = settings
        self.provider = provider if provider is not None else RulesInForce(store, settings)

    # -- what is in force --------------------------------------------------------------------------------

    def base_text(self) -> tuple[str, str]:
        """Text and source of the rules used while no version is saved (config file or shipped defaults)."""
        return self.provider.base_text()

    def current(self) -> CurrentRules:
        """The rules in force now (the provider's)."""
        return self.provider.current()

    def select(self, summaries: Sequence[SeriesSummary]) -> list[RuleDecision]:
        """Routing with the rules in force (the provider's ``select``)."""
        return self.provider.select(summaries)

    # -- validation -------------------------------------------------------------------------------------

    def parse(self, text: str) -> RuleSet:
        """Validated rules from YAML text; ``ConfigError`` naming rule, condition and field."""
        return self.provider.parse(text)

    def validate(self, text: str) -> list[RuleProblem]:
        """Every problem of ``text`` (empty list: valid)."""
        try:
            self.parse(text)
        except ConfigError as exc:
            return problems_of(exc)
        return []

    # -- versions ---------------------------------------------------------------------------------------

    def save(self, text: str, author: str, comment: str | None = None) -> int:
        """Validate and keep ``text`` as the new version in force; audited. ``ConfigError`` when invalid."""
        self.parse(text)
        before = self.current()
        vid = self.store.add_rule_version(author, text, comment)
        self.store.audit(
            author,
            "rules.save",
            f"rules:version:{vid}",
            before={"version": before.version, "source": before.source, "yaml": before.text},
            after={"version": vid, "comment": comment, "yaml": text},
        )
        return vid

    def rollback(self, version_id: int, author: str) -> int:
        """Put an earlier version back in force (as a new version, so history only grows)."""
        old = self.store.get_rule_version(version_id)
        return self.save(old.yaml_text, author, f"roll back to version {version_id}")

    def version_text(self, version_id: int | None) -> str:
        """Text of a saved version, or of the base rules for None / 0."""
        if not version_id:
            return self.base_text()[0]
        return self.store.get_rule_version(version_id).yaml_text

    def diff(self, a: int | None, b: int | None) -> str:
        """Unified diff between two versions (None / 0 = the base rules)."""
        ta, tb = self.version_text(a), self.version_text(b)
        la = f"version {a}" if a else "base rules"
        lb = f"version {b}" if b else "base rules"
        return "".join(
            difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True), la, lb)
        )

    # -- dry runs ---------------------------------------------------------------------------------------

    def explain(self, study_uid: str, text: str | None = None) -> list[dict[str, Any]]:
        """Decisions with reasons for every series of a received study, with ``text`` or the rules in force.

        Raises
        ------
        ConfigError
            ``text`` is invalid.
        dicomnode.store.NotFoundError
            No such study.
        """
        rules = self.parse(text) if text is not None else self.current().rules
        summaries = self.store.series_summaries(study_uid)
        decisions = routing.select(summaries, rules, all_destinations=self.settings.destination_names)
        return explain_rows(decisions, summaries)
