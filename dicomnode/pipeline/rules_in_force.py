"""The routing rules in force: the one provider the runner routes with and the admin UI shows and edits.

Constructed once (``dicomnode.cli.node``) and handed to both the :class:`~dicomnode.pipeline.runner.Runner`
(``select=rules.select``) and the web app (``create_app(..., rules=rules)``), so a rule version saved in the
UI applies to the next routed study without a restart and nobody patches anything after construction.
Where the rules come from, first found:

1. the newest row of the store's ``rule_versions`` (saved in the UI or with ``PUT /api/rules``, by any
   process on the same database: it is read at every routing call, one indexed query);
2. ``settings.rules_file``;
3. the shipped ``default_rules.yaml``.

A saved version that no longer validates (e.g. it names a destination since removed from the config) is
logged once and the rules in force before it stay in force.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dicomnode import routing
from dicomnode.domain import RuleDecision, SeriesSummary
from dicomnode.errors import ConfigError, RuleProblem, RulesError
from dicomnode.routing import RuleSet

if TYPE_CHECKING:  # typing only: `dicomnode analyze` routes a folder without the database layer
    from dicomnode.config import Settings
    from dicomnode.store import Store

log = logging.getLogger(__name__)

__all__ = ["CurrentRules", "RulesInForce", "SelectFn", "file_select", "parse_rules_text"]

#: Routing: the summaries of one study's series -> one decision per series.
SelectFn = Callable[[Sequence[SeriesSummary]], Sequence[RuleDecision]]


@dataclass(frozen=True)
class CurrentRules:
    """The rules in force: parsed, their text, and where they came from."""

    rules: RuleSet
    text: str
    #: Store rule version id, or None for the config file / shipped defaults.
    version: int | None
    source: str


def parse_rules_text(text: str, destinations: Sequence[str] = ()) -> RuleSet:
    """Validated rules from YAML *text* (never read as a file name).

    Raises
    ------
    ConfigError
        :class:`~dicomnode.errors.RulesError` (its ``problems`` locate each problem as data): empty text,
        invalid YAML (with line and column), or invalid rules.
    """
    if not text.strip():
        raise RulesError("rules", [RuleProblem("the rules text is empty")])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = mark.line + 1 if mark is not None else None
        raise RulesError("rules", [RuleProblem(f"invalid YAML{where}: {problem}", line=line)]) from None
    return routing.parse_rules(data, source="text", destinations=destinations)


def file_select(rules_file: Path | None = None, destinations: Sequence[str] = ()) -> SelectFn:
    """Routing with the rules of a file (``dicomnode analyze --rules FILE``), or the shipped defaults.

    Raises
    ------
    ConfigError
        The file is unreadable or its rules are invalid (one line).
    """
    rules = (
        routing.load_rules(rules_file, destinations=destinations or None)
        if rules_file is not None
        else routing.default_rules()
    )

    def select(summaries: Sequence[SeriesSummary]) -> Sequence[RuleDecision]:
        return routing.select(list(summaries), rules, all_destinations=destinations)

    return select


class RulesInForce:
    """The rules provider over a store (see the module docstring for where the rules come from).

    Parameters
    ----------
    store
        Holds the saved rule versions.
    settings
        ``rules_file`` (the fallback when no version was saved) and the destination names.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: CurrentRules | None = None
        self._base: CurrentRules | None = None
        #: The newest saved version id seen, valid or not (an invalid one is reported once).
        self._seen: int | None = None

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(self.settings.destination_names)

    def parse(self, text: str) -> RuleSet:
        """Validated rules from YAML text with this node's destination names (:func:`parse_rules_text`)."""
        return parse_rules_text(text, self.destinations)

    def base_text(self) -> tuple[str, str]:
        """Text and source of the rules used while no version is saved (config file or shipped defaults)."""
        if self.settings.rules_file is not None:
            return self.settings.rules_file.read_text(encoding="utf-8"), str(self.settings.rules_file.name)
        return routing.default_rules_text(), "default"

    def _base_rules(self) -> CurrentRules:
        if self._base is None:
            text, source = self.base_text()
            self._base = CurrentRules(self.parse(text), text, None, source)
        return self._base

    def current(self) -> CurrentRules:
        """The rules in force now (the newest valid saved version; re-read when a new version appears)."""
        latest = self.store.latest_rule_version()
        with self._lock:
            if latest is None:
                self._cache = self._base_rules()
                return self._cache
            if self._cache is not None and (self._seen == latest.id or self._cache.version == latest.id):
                return self._cache
            self._seen = latest.id
            try:
                rules = self.parse(latest.yaml_text)
                self._cache = CurrentRules(rules, latest.yaml_text, latest.id, f"version {latest.id}")
                log.info("routing: rule version %d in force", latest.id)
            except ConfigError as exc:
                log.error(
                    "routing: rule version %d is invalid, keeping the previous rules: %s",
                    latest.id,
                    " ".join(str(exc).split())[:300],
                )
                if self._cache is None:
                    self._cache = self._base_rules()
            return self._cache

    def select(self, summaries: Sequence[SeriesSummary]) -> list[RuleDecision]:
        """Routing with the rules in force (the ``select`` of the runner)."""
        return routing.select(list(summaries), self.current().rules, all_destinations=self.destinations)
