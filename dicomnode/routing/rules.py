"""Rule models and their loading/validation (rules are data, checked when loaded, never run as code).

A rules file (YAML)::

    mode: first_match            # or all_match: every matching rule yields a decision
    fallback: {action: ignore}   # when no rule matches
    rules:
      - name: abdominal-ct-bmd
        action: analyze          # or ignore (the older spelling analyse is read as analyze)
        pipeline: bmd
        destinations: []         # names from the config; empty = every configured destination
        select: best             # best = one series per study (ranked), all = every accepted series
        conditions:              # all must hold
          - {attribute: Modality, equals: CT}
          - {attribute: ImageType, contains: [ORIGINAL, PRIMARY, AXIAL]}
          - {attribute: ImageType, contains: LOCALIZER, not: true}
          - {attribute: SliceThickness, range: {max: 5}}
          - {attribute: derived.images, range: {min: 30}}

Operators (exactly one per condition): ``equals``, ``one_of``, ``regex`` (searched, not anchored),
``range: {min, max}`` (inclusive, numeric), ``present: true/false``, ``contains`` (a value or a list that must
all be among the values of a multi-valued attribute such as ImageType). Options: ``not: true`` negates;
``case_sensitive: true`` (default: text compares case-insensitively, values are stripped).
On a multi-valued attribute ``equals`` compares the backslash-joined value (``ORIGINAL\\PRIMARY\\AXIAL``),
``one_of`` holds when any value is in the list, ``regex`` searches the joined value, ``range`` uses the first
value. An absent attribute fails every operator except ``present: false`` (so ``not`` conditions hold on it).

``attribute`` is a DICOM keyword (checked against pydicom's data dictionary; series- or study-level, as
summarised in :class:`~dicomnode.domain.SeriesSummary`) or a derived value: ``derived.instances`` (instances
received), ``derived.images`` (instances x NumberOfFrames, so enhanced multi-frame CT counts its frames),
``derived.z_extent_mm`` (extent along the slice normal), ``derived.slice_mm`` (SliceThickness, or when the
header has none the slice spacing of the positions: geometry, not an optional tag).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Collection, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

from dicomnode.errors import ConfigError, RuleProblem, RulesError
from dicomnode.vocab import ANALYZE, rule_action

#: Values computed from the series rather than read from a header.
DERIVED_ATTRIBUTES: frozenset[str] = frozenset(
    {"derived.instances", "derived.images", "derived.z_extent_mm", "derived.slice_mm"}
)

Scalar = str | int | float
DEFAULT_PIPELINE = "bmd"
OPERATORS: tuple[str, ...] = ("equals", "one_of", "regex", "range", "present", "contains")


def _no_bool(value: Any) -> Any:
    # YAML 1.1 reads unquoted NO / YES / ON / OFF as booleans: almost always a mistake in a DICOM rule.
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise ValueError("YAML read a bare yes/no/on/off/true/false as a boolean; quote the value ('NO')")
    return value


class ValueRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ValueRange:
        if self.min is None and self.max is None:
            raise ValueError("range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("range min is above max")
        return self


class Condition(BaseModel):
    """One test on one attribute."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    attribute: str = Field(min_length=1)
    equals: Scalar | None = None
    one_of: list[Scalar] | None = None
    regex: str | None = None
    range: ValueRange | None = None
    present: bool | None = None
    contains: str | list[str] | None = None
    negate: bool = Field(False, alias="not")
    case_sensitive: bool = False

    _no_bool_equals = field_validator("equals", "one_of", "contains", mode="before")(_no_bool)

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = [op for op in OPERATORS if getattr(self, op) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(OPERATORS)} (got {', '.join(given) if given else 'none'})"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from None
        if self.one_of is not None and not self.one_of:
            raise ValueError("one_of needs at least one value")
        return self

    @property
    def operator(self) -> str:
        return next(op for op in OPERATORS if getattr(self, op) is not None)

    def describe(self) -> str:
        """E.g. ``ImageType contains ORIGINAL, PRIMARY`` or ``not (Modality equals MR)``."""
        op = self.operator
        if op == "range":
            assert self.range is not None
            lo, hi = self.range.min, self.range.max
            if lo is not None and hi is not None:
                text = f"{self.attribute} in [{_num(lo)}, {_num(hi)}]"
            elif lo is not None:
                text = f"{self.attribute} >= {_num(lo)}"
            else:
                text = f"{self.attribute} <= {_num(hi)}"
        elif op == "present":
            text = f"{self.attribute} {'present' if self.present else 'absent'}"
        elif op == "one_of":
            assert self.one_of is not None
            shown = ", ".join(map(str, self.one_of[:8]))
            more = f", ... ({len(self.one_of)} values)" if len(self.one_of) > 8 else ""
            text = f"{self.attribute} one of {shown}{more}"
        elif op == "contains":
            vals = [self.contains] if isinstance(self.contains, str) else list(self.contains or [])
            text = f"{self.attribute} contains {', '.join(vals)}"
        elif op == "regex":
            text = f"{self.attribute} matches /{self.regex}/"
        else:
            text = f"{self.attribute} equals {self.equals}"
        return f"not ({text})" if self.negate else text


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def _with_default_pipeline(data: Any) -> Any:
    # "bmd" is the only pipeline today; defaulted so short rules (and fallbacks) stay short.
    if isinstance(data, dict) and "action" in data:
        data = {**data, "action": rule_action(data["action"])}  # the older spelling "analyse" is accepted
    if isinstance(data, dict) and data.get("action") == ANALYZE and not data.get("pipeline"):
        return {**data, "pipeline": DEFAULT_PIPELINE}
    return data


class _Outcome(BaseModel):
    """What a matching rule (or the fallback) does with a series: the fields both share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["analyze", "ignore"] = "ignore"
    pipeline: str | None = None
    #: Destination names from the config; empty = every configured destination.
    destinations: list[str] = Field(default_factory=list)
    select: Literal["best", "all"] = "best"

    @model_validator(mode="before")
    @classmethod
    def _default_pipeline(cls, data: Any) -> Any:
        return _with_default_pipeline(data)


class Rule(_Outcome):
    """An ordered rule: all ``conditions`` hold -> ``action`` (which a rule must give)."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    action: Literal["analyze", "ignore"]

    @model_validator(mode="after")
    def _ignore_plain(self) -> Rule:
        if self.action == "ignore" and (self.pipeline or self.destinations):
            raise ValueError("an 'ignore' rule takes no pipeline or destinations")
        return self


class Fallback(_Outcome):
    """What happens to a series no rule matched."""


class RankingOptions(BaseModel):
    """Knobs of the best-series ranking (see :mod:`dicomnode.routing.ranking`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A series shorter than this along z is unlikely to hold T12-L2 (3 vertebrae of about 30 mm each).
    min_lumbar_extent_mm: float = Field(90.0, ge=0)
    #: Extra regexes (case-insensitive, searched) marking a kernel as sharp (added to the built-in list).
    extra_sharp_kernel_patterns: list[str] = Field(default_factory=list)

    @field_validator("extra_sharp_kernel_patterns")
    @classmethod
    def _compile(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regex {p!r}: {exc}") from None
        return value


class RuleSet(BaseModel):
    """A validated set of rules (what :func:`load_rules` returns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["first_match", "all_match"] = "first_match"
    rules: list[Rule] = Field(default_factory=list)
    fallback: Fallback = Field(default_factory=Fallback)
    ranking: RankingOptions = Field(default_factory=RankingOptions)
    #: Where the rules came from (a path, "default", or "text"); informational.
    source: str = Field("text", exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique, repeated: {', '.join(dupes)}")
        return self

    def destinations_used(self) -> set[str]:
        out = set(self.fallback.destinations)
        for r in self.rules:
            out.update(r.destinations)
        return out

    def check_destinations(self, known: Collection[str]) -> None:
        """Raise :class:`ConfigError` when a rule names a destination that is not configured."""
        known_set = set(known)
        for r in self.rules:
            for d in r.destinations:
                if d not in known_set:
                    text = (
                        f"rule {r.name!r}: unknown destination {d!r} "
                        f"(configured: {', '.join(sorted(known_set)) or 'none'})"
                    )
                    raise RulesError("rules", [RuleProblem(text, rule=r.name, field="destinations")])
        for d in self.fallback.destinations:
            if d not in known_set:
                text = f"fallback: unknown destination {d!r}"
                raise RulesError("rules", [RuleProblem(text, field="fallback.destinations")])


@cache
def _keywords() -> frozenset[str]:
    return frozenset(keyword_dict)


def is_known_attribute(name: str) -> bool:
    """A DICOM keyword from pydicom's dictionary, or one of :data:`DERIVED_ATTRIBUTES`."""
    return name in DERIVED_ATTRIBUTES or name in _keywords()


def _check_keywords(rs: RuleSet, where: str) -> None:
    problems = []
    for r in rs.rules:
        for i, c in enumerate(r.conditions, start=1):
            if not is_known_attribute(c.attribute):
                close = difflib.get_close_matches(c.attribute, [*_keywords(), *DERIVED_ATTRIBUTES], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                text = f"rule {r.name!r} condition {i}: unknown DICOM keyword {c.attribute!r}{hint}"
                problems.append(RuleProblem(text, rule=r.name, condition=i, field="attribute"))
    if problems:
        raise RulesError(where, problems)


def _problem(err: Mapping[str, Any], data: Any) -> RuleProblem:
    """One pydantic error as a located problem (rule name or number, condition number, field)."""
    loc = list(err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    rule: str | None = None
    condition: int | None = None
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        name = None
        with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
            name = data["rules"][loc[1]].get("name")
        rule = str(name) if name else str(loc[1] + 1)
        label = f"rule {name!r}" if name else f"rule {loc[1] + 1}"
        rest = loc[2:]
        if len(rest) >= 2 and rest[0] == "conditions" and isinstance(rest[1], int):
            condition = rest[1] + 1
            label += f" condition {condition}"
            rest = rest[2:]
    else:
        label, rest = "", loc
    field = ".".join(str(x) for x in rest) or None
    head = ": ".join(x for x in (label, field) if x)
    return RuleProblem(f"{head}: {msg}" if head else msg, rule=rule, condition=condition, field=field)


def parse_rules(data: Any, *, source: str = "text", destinations: Collection[str] | None = None) -> RuleSet:
    """Validate already-parsed YAML (a mapping) into a :class:`RuleSet`; see :func:`load_rules`."""
    where = "rules" if source in ("text", "default") else f"rules ({Path(source).name})"
    if not isinstance(data, Mapping):
        raise RulesError(where, [RuleProblem("the rules file must hold a mapping with a 'rules' list")])
    try:
        rs = RuleSet.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise RulesError(where, [_problem(e, data) for e in exc.errors()]) from None
    _check_keywords(rs, where)
    if destinations is not None:
        rs.check_destinations(destinations)
    return rs


def load_rules(path_or_text: Path | str, *, destinations: Collection[str] | None = None) -> RuleSet:
    """Load and validate routing rules.

    Parameters
    ----------
    path_or_text
        A :class:`~pathlib.Path` to a YAML file, a string naming an existing file, or YAML text.
    destinations
        Configured destination names; when given, every destination a rule names must be among them.

    Raises
    ------
    ConfigError
        Unreadable file, invalid YAML, unknown field or operator, unknown DICOM keyword (naming the rule and
        condition), unknown destination.
    """
    source = "text"
    if isinstance(path_or_text, Path) or ("\n" not in path_or_text and Path(path_or_text).is_file()):
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"rules: cannot read {path}: {exc.strerror or exc}") from None
        source = str(path)
    else:
        text = path_or_text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(s.strip() for s in str(exc).strip().splitlines()[:3])
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RulesError("rules", [RuleProblem(f"invalid YAML: {detail}", line=line)]) from None
    return parse_rules(data, source=source, destinations=destinations)


def default_rules_text() -> str:
    """The text of the shipped ``default_rules.yaml``."""
    return resources.files("dicomnode.routing").joinpath("default_rules.yaml").read_text(encoding="utf-8")


def default_rules() -> RuleSet:
    """The shipped rules: abdominal CT suitable for BMD (see ``default_rules.yaml``)."""
    return parse_rules(yaml.safe_load(default_rules_text()), source="default")
