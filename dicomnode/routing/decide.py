"""Apply a :class:`~dicomnode.routing.rules.RuleSet` to series summaries: decisions with reasons (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomnode.domain import RuleDecision, SeriesSummary
from dicomnode.routing.ranking import image_count, rank, slice_mm, values_of, why_better
from dicomnode.routing.rules import Condition, Rule, RuleSet
from dicomnode.vocab import ANALYZE

_MISSING = object()


@dataclass(frozen=True)
class ConditionResult:
    condition: Condition
    passed: bool
    value: str  # what was seen, for the explanation

    def reason(self, rule: str) -> str:
        return f"{rule}: {self.condition.describe()}: {'pass' if self.passed else 'FAIL'} ({self.value})"


def attribute_value(s: SeriesSummary, name: str) -> Any:
    """The value a condition tests: a header value from the summary, or a derived value."""
    if name == "derived.instances":
        return s.n_instances
    if name == "derived.images":
        return image_count(s)
    if name == "derived.z_extent_mm":
        return _MISSING if s.z_extent_mm is None else s.z_extent_mm
    if name == "derived.slice_mm":
        mm = slice_mm(s)
        return _MISSING if mm is None else mm
    v = s.attributes.get(name, _MISSING)
    return _MISSING if v is None else v


def _show(value: Any) -> str:
    if value is _MISSING:
        return "absent"
    vals = values_of(value)
    text = "\\".join(str(v) for v in vals) if vals else "empty"
    return text if len(text) <= 48 else text[:45] + "..."


def _norm(v: Any, case_sensitive: bool) -> str:
    t = str(v).strip()
    return t if case_sensitive else t.upper()


def _as_float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _scalar_equal(a: Any, b: Any, case_sensitive: bool) -> bool:
    # Numbers compare as numbers ("5" == 5.0: DICOM DS/IS arrive as text or numbers), the rest as text.
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return fa == fb
    return _norm(a, case_sensitive) == _norm(b, case_sensitive)


def evaluate_condition(c: Condition, s: SeriesSummary) -> ConditionResult:
    """Test one condition on one series."""
    value = attribute_value(s, c.attribute)
    vals = values_of(value) if value is not _MISSING else ()
    present = value is not _MISSING and any(str(v).strip() != "" for v in vals)
    cs = c.case_sensitive
    ok: bool
    if c.present is not None:
        ok = present == c.present
    elif not present:
        ok = False
    elif c.equals is not None:
        ok = (
            _scalar_equal(vals[0], c.equals, cs)
            if len(vals) == 1
            else _norm("\\".join(map(str, vals)), cs) == _norm(c.equals, cs)
        )
    elif c.one_of is not None:
        ok = any(_scalar_equal(v, w, cs) for v in vals for w in c.one_of)
    elif c.contains is not None:
        want = [c.contains] if isinstance(c.contains, str) else c.contains
        have = {_norm(v, cs) for v in vals}
        ok = all(_norm(w, cs) in have for w in want)
    elif c.regex is not None:
        flags = 0 if cs else re.IGNORECASE
        ok = re.search(c.regex, "\\".join(str(v).strip() for v in vals), flags) is not None
    else:
        assert c.range is not None
        f = _as_float(vals[0])
        ok = (
            f is not None
            and (c.range.min is None or f >= c.range.min)
            and (c.range.max is None or f <= c.range.max)
        )
    if c.negate:
        ok = not ok
    return ConditionResult(c, ok, _show(value))


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    matched: bool
    conditions: tuple[ConditionResult, ...]

    def reasons(self, *, failures_only: bool = False) -> list[str]:
        return [r.reason(self.rule.name) for r in self.conditions if not (failures_only and r.passed)]


def evaluate_rule(rule: Rule, s: SeriesSummary) -> RuleResult:
    """Every condition of ``rule`` on ``s`` (not short-circuited: the explanation lists all failures)."""
    results = tuple(evaluate_condition(c, s) for c in rule.conditions)
    return RuleResult(rule, all(r.passed for r in results), results)


@dataclass
class _Pending:
    """A decision being built (ranking fills in selection and rank)."""

    series: SeriesSummary
    rule: str | None
    action: str
    pipeline: str | None
    destinations: tuple[str, ...]
    select: str
    reasons: list[str]
    selected: bool = False
    rank: int | None = None


def select(
    series: Sequence[SeriesSummary], rules: RuleSet, *, all_destinations: Sequence[str] = ()
) -> list[RuleDecision]:
    """Decide, for every series, whether it is analysed, by which rule, and why.

    Parameters
    ----------
    series
        Summaries of the series to route (normally all series of one study; several studies also work,
        ranking is per study).
    rules
        The validated rule set.
    all_destinations
        Every configured destination name: a rule with an empty ``destinations`` list sends to all of them.

    Returns
    -------
    list of RuleDecision
        In input order. ``first_match``: one decision per series. ``all_match``: one per matching rule (or
        one fallback decision). Among the series of a study that one ``select: best`` rule accepts, exactly
        one is ``selected`` (rank 1); the others say which series ranked higher and why.
    """
    pending: list[_Pending] = []
    for s in series:
        evaluated: list[RuleResult] = []
        matched: list[RuleResult] = []
        for rule in rules.rules:
            res = evaluate_rule(rule, s)
            evaluated.append(res)
            if res.matched:
                matched.append(res)
                if rules.mode == "first_match":
                    break
        if matched:
            for m in matched:
                reasons = []
                for e in evaluated:
                    if e is m:
                        break
                    if not e.matched:
                        reasons.append(f"rule {e.rule.name!r} not matched")
                        reasons.extend(e.reasons(failures_only=True))
                reasons.append(f"rule {m.rule.name!r} matched: {m.rule.action}")
                reasons.extend(m.reasons())
                pending.append(
                    _Pending(
                        series=s,
                        rule=m.rule.name,
                        action=m.rule.action,
                        pipeline=m.rule.pipeline if m.rule.action == ANALYZE else None,
                        destinations=_dests(m.rule.destinations, all_destinations, m.rule.action),
                        select=m.rule.select,
                        reasons=reasons,
                    )
                )
        else:
            fb = rules.fallback
            reasons = []
            for e in evaluated:
                reasons.append(f"rule {e.rule.name!r} not matched")
                reasons.extend(e.reasons(failures_only=True))
            reasons.append(f"no rule matched: fallback {fb.action}")
            pending.append(
                _Pending(
                    series=s,
                    rule=None,
                    action=fb.action,
                    pipeline=fb.pipeline if fb.action == ANALYZE else None,
                    destinations=_dests(fb.destinations, all_destinations, fb.action),
                    select=fb.select,
                    reasons=reasons,
                )
            )
    _rank_groups(pending, rules)
    return [
        RuleDecision(
            series_instance_uid=p.series.series_instance_uid,
            selected=p.selected,
            rule=p.rule,
            action=p.action,
            pipeline=p.pipeline,
            destinations=p.destinations,
            reasons=tuple(p.reasons),
            rank=p.rank,
        )
        for p in pending
    ]


def _dests(names: Sequence[str], all_destinations: Sequence[str], action: str) -> tuple[str, ...]:
    if action != ANALYZE:
        return ()
    return tuple(names) if names else tuple(all_destinations)


def _rank_groups(pending: list[_Pending], rules: RuleSet) -> None:
    groups: dict[tuple[str, str | None], list[_Pending]] = {}
    for p in pending:
        if p.action == ANALYZE:
            groups.setdefault((p.series.study_instance_uid, p.rule), []).append(p)
    opts = rules.ranking
    for group in groups.values():
        by_uid = {id(p.series): p for p in group}
        ranked = rank(
            [p.series for p in group],
            min_lumbar_extent_mm=opts.min_lumbar_extent_mm,
            extra_sharp=opts.extra_sharp_kernel_patterns,
        )
        best_series, best_feat = ranked[0]
        n = len(ranked)
        for i, (s, feat) in enumerate(ranked, start=1):
            p = by_uid[id(s)]
            p.rank = i
            if p.select == "all" or i == 1:
                p.selected = True
                label = "best" if i == 1 else "selected (select: all)"
                p.reasons.append(f"ranking: {i} of {n} in study ({label}): {feat.describe()}")
            else:
                p.selected = False
                p.reasons.append(
                    f"ranking: {i} of {n} in study, not selected: series {best_series.series_instance_uid} "
                    f"ranks higher ({why_better(best_feat, feat)}); this one: {feat.describe()}"
                )


def explain(
    decisions: Sequence[RuleDecision], series: Sequence[SeriesSummary] = (), *, verbose: bool = True
) -> str:
    """A text table of decisions (one line per decision), then each decision's reasons when ``verbose``."""
    by_uid = {s.series_instance_uid: s for s in series}
    header = ("SERIES", "DESCRIPTION", "MOD", "IMAGES", "RULE", "ACTION", "SELECTED", "RANK")
    rows: list[tuple[str, ...]] = []
    for d in decisions:
        s = by_uid.get(d.series_instance_uid)
        desc = str(s.get("SeriesDescription", "") or "") if s else ""
        mod = str(s.get("Modality", "") or "") if s else ""
        images = str(image_count(s)) if s else ""
        rows.append(
            (
                _short_uid(d.series_instance_uid),
                desc[:28],
                mod,
                images,
                d.rule or "(fallback)",
                d.action,
                "yes" if d.selected else "no",
                "" if d.rank is None else str(d.rank),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if verbose:
        for d in decisions:
            lines.append("")
            verdict = "SELECTED" if d.selected else "not selected"
            lines.append(f"{d.series_instance_uid}: {verdict} ({d.action}, rule {d.rule or '(fallback)'})")
            lines.extend(f"  - {r}" for r in d.reasons)
    return "\n".join(lines)


def _short_uid(uid: str, n: int = 28) -> str:
    return uid if len(uid) <= n else "..." + uid[-(n - 3) :]
