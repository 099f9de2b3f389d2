"""Routing: which received series get analysed, and why (pure; rules are data validated at load).

API::

    from dicomnode.routing import load_rules, default_rules, select, explain
    rules = load_rules(Path("rules.yaml"), destinations=settings.destination_names)  # ConfigError if bad
    decisions = select(store.series_summaries(study_uid), rules, all_destinations=settings.destination_names)
    print(explain(decisions, summaries))

* :func:`load_rules` (``path_or_text``, ``destinations=None``) -> :class:`RuleSet`;
  :func:`default_rules` -> the shipped ``default_rules.yaml`` (abdominal CT for BMD).
* :func:`select` (``series, rules, *, all_destinations=()``) -> ``list[RuleDecision]``: every decision carries
  its reasons (conditions passed/failed per rule, ranking); per study and ``select: best`` rule exactly one
  series is ``selected`` (rank 1).
* :func:`explain` (``decisions, series=(), *, verbose=True``) -> a text table plus reasons.

The rule language is documented in :mod:`dicomnode.routing.rules`, ranking in
:mod:`dicomnode.routing.ranking`.
"""

from dicomnode.routing.decide import evaluate_condition, evaluate_rule, explain, select
from dicomnode.routing.ranking import SHARP_KERNEL_PATTERNS, is_native, is_sharp_kernel
from dicomnode.routing.rules import (
    DERIVED_ATTRIBUTES,
    Condition,
    Fallback,
    Rule,
    RuleSet,
    default_rules,
    default_rules_text,
    is_known_attribute,
    load_rules,
    parse_rules,
)

__all__ = [
    "DERIVED_ATTRIBUTES",
    "SHARP_KERNEL_PATTERNS",
    "Condition",
    "Fallback",
    "Rule",
    "RuleSet",
    "default_rules",
    "default_rules_text",
    "evaluate_condition",
    "evaluate_rule",
    "explain",
    "is_known_attribute",
    "is_native",
    "is_sharp_kernel",
    "load_rules",
    "parse_rules",
    "select",
]
