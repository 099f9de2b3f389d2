"""Admin sub-commands: ``check-config``, ``db upgrade`` / ``current``, ``rules explain`` / ``default``.

* ``dicomnode check-config [FILE]``: validate the settings and the routing rules without starting anything.
  Exit 0 and a one-screen summary ("config OK"), or exit 2 with the failing field named.
* ``dicomnode db upgrade [--config FILE]``: apply the database migrations (idempotent). ``db current`` shows
  the revision.
* ``dicomnode rules explain PATH-or-STUDY-UID [--rules FILE] [--config FILE]``: for a folder/file of DICOM, or
  a study already received (looked up in the database), print per series whether it would be selected and
  why. ``dicomnode rules default`` prints the shipped rules (a starting point for your own).

The config file is ``--config FILE`` (or the positional FILE of ``check-config``), else the file named by the
``DICOMNODE_CONFIG`` environment variable, else defaults; ``DICOMNODE_*`` variables override either way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import ConfigError, DicomnodeError

if TYPE_CHECKING:
    from dicomnode.config import Settings
    from dicomnode.domain import SeriesSummary
    from dicomnode.routing import RuleSet

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def register(subparsers: Any) -> None:
    cc: argparse.ArgumentParser = subparsers.add_parser(
        "check-config",
        help="validate the configuration and routing rules (exit 0 OK, 2 invalid)",
        description="Validate the configuration file (and the routing rules it points to) without starting "
        "anything. Exit 0 when valid, 2 naming the invalid field otherwise.",
    )
    cc.add_argument(
        "file", nargs="?", type=Path, help="config file (YAML or TOML); default: $DICOMNODE_CONFIG"
    )
    cc.add_argument("--config", dest="config_opt", type=Path, help=argparse.SUPPRESS)
    cc.set_defaults(handler=run_check_config)

    db: argparse.ArgumentParser = subparsers.add_parser("db", help="database maintenance (migrations)")
    dbsub = db.add_subparsers(dest="db_command", metavar="ACTION")
    up = dbsub.add_parser("upgrade", help="apply the database migrations (idempotent)")
    up.add_argument("--config", type=Path, help="config file (default: $DICOMNODE_CONFIG)")
    up.set_defaults(handler=run_db_upgrade)
    cur = dbsub.add_parser("current", help="show the database schema revision")
    cur.add_argument("--config", type=Path, help="config file (default: $DICOMNODE_CONFIG)")
    cur.set_defaults(handler=run_db_current)
    db.set_defaults(handler=lambda _a: _usage(db))

    rules: argparse.ArgumentParser = subparsers.add_parser("rules", help="routing rules: explain, default")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    ex = rsub.add_parser(
        "explain",
        help="which series of a DICOM folder or received study the rules select, and why",
        description="For each series: selected or not, by which rule, and every reason.",
    )
    ex.add_argument("target", help="a DICOM folder/file, or the StudyInstanceUID of a received study")
    ex.add_argument(
        "--rules", type=Path, help="rules file (default: the config's rules_file, else the shipped rules)"
    )
    ex.add_argument("--config", type=Path, help="config file (default: $DICOMNODE_CONFIG)")
    ex.add_argument("--brief", action="store_true", help="only the table, not every reason")
    ex.set_defaults(handler=run_rules_explain)
    de = rsub.add_parser("default", help="print the shipped default rules (YAML)")
    de.set_defaults(handler=run_rules_default)
    rules.set_defaults(handler=lambda _a: _usage(rules))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_CONFIG


def _config_path(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    env = os.environ.get("DICOMNODE_CONFIG")
    return Path(env) if env else None


def _err(msg: str) -> None:
    sys.stderr.write(f"dicomnode: {msg}\n")


def load_config_and_rules(config: Path | None, rules_file: Path | None = None) -> tuple[Settings, RuleSet]:
    """Settings plus the rules they select (``rules_file`` overrides); destinations checked against config."""
    from dicomnode.config import load_settings
    from dicomnode.routing import default_rules, load_rules

    settings = load_settings(config)
    path = rules_file or settings.rules_file
    names = settings.destination_names
    if path is None:
        rs = default_rules()
        rs.check_destinations(names)
    else:
        rs = load_rules(Path(path), destinations=names)
    return settings, rs


# -- check-config ---------------------------------------------------------------------------------------


def run_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args.file or args.config_opt)
    try:
        settings, rules = load_config_and_rules(path)
        from dicomnode.store.engine import check_url

        check_url(settings.database_url_resolved())  # parses the URL; creates and connects to nothing
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    from dicomnode.tls import check_settings

    tls_problems = check_settings(settings)  # certificate files: readable, dates, key matches, CA bundles
    for line in tls_problems:
        _err(line)
    if tls_problems:
        return EXIT_CONFIG
    print(config_summary(settings, rules, path))
    return EXIT_OK


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable URLs were rejected earlier; never print a password by accident
        return "(unparsable)"


def _days(days: int) -> str:
    return f"{days} days" if days else "kept"


def _tls_lines(settings: Settings) -> list[str]:
    from dicomnode.tls import summary_lines

    return summary_lines(settings)


def config_summary(settings: Settings, rules: RuleSet, path: Path | None) -> str:
    """The "config OK" text of ``check-config``."""
    d = settings.dicom
    allowed = ", ".join(a.ae_title + (f"@{a.address}" if a.address else "") for a in d.allowed_calling_aets)
    lines = [
        f"config OK ({path if path else 'defaults'})",
        f"  data_dir      {settings.data_dir}",
        f"  database      {_redact_url(settings.database_url_resolved())}",
        f"  dicom         AE {d.ae_title} on {d.host}:{d.port or '(no plain port)'}; "
        f"calling AEs: {allowed or 'any'}; "
        f"other storage classes: {d.accept_other_storage_classes}; max associations {d.max_associations}",
        f"  receiving     {d.receive_process_count} process(es)"
        + (" (auto: min(4, CPUs), 1 with 2 CPUs or fewer)" if d.receive_processes == "auto" else "")
        + ("" if d.receive_process_count > 1 else ", inside the node's process"),
        f"  durability    {d.durability}: "
        + (
            "a success status survives a power loss (files, directories and record flushed first)"
            if d.flush_to_device
            else "a success status survives a crash of the node's process, NOT a power loss or kernel crash"
        ),
        f"  http          {settings.http.host}:{settings.http.port}",
        *_tls_lines(settings),
        f"  completion    series quiet {settings.completion.series_quiet_seconds:g} s, study quiet "
        f"{settings.completion.study_quiet_seconds:g} s, max wait {settings.completion.max_wait_seconds:g} s",
    ]
    if settings.destinations:
        for dest in settings.destinations:
            where = f"{dest.ae_title}@{dest.host}:{dest.port}" if dest.kind == "dimse" else f"{dest.url}"
            lines.append(f"  destination   {dest.name} ({dest.kind}) {where}")
    else:
        lines.append("  destinations  none (results are kept, nothing is sent)")
    lines += [
        f"  delivery      up to {settings.delivery.max_attempts} attempts, backoff "
        f"{settings.delivery.backoff_base_seconds:g}-{settings.delivery.backoff_max_seconds:g} s",
        f"  rules         {rules.source} ({len(rules.rules)} rules, {rules.mode}, fallback "
        f"{rules.fallback.action})",
        f"  analysis      backend {settings.analysis.backend}, erosion {settings.analysis.erosion_mm:g} mm, "
        f"contrast policy {settings.analysis.contrast_policy}",
        f"  workers       {settings.workers.count} x {settings.workers.executor}",
        f"  retention     spool {_days(settings.retention.spool_days)}, "
        f"results {_days(settings.retention.results_days)}",
    ]
    return "\n".join(lines)


# -- db -------------------------------------------------------------------------------------------------


def _engine(config: Path | None) -> Any:
    from dicomnode.config import load_settings
    from dicomnode.store import make_engine

    settings = load_settings(_config_path(config))
    return make_engine(settings.database_url_resolved()), settings


def run_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from dicomnode.store import head_revision, upgrade

    try:
        engine, settings = _engine(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    try:
        rev = upgrade(engine)
    except SQLAlchemyError as exc:
        _err(f"database upgrade failed ({_redact_url(settings.database_url_resolved())}): {_one_line(exc)}")
        return EXIT_FAILURE
    finally:
        engine.dispose()
    url = _redact_url(settings.database_url_resolved())
    print(f"database at revision {rev} (head {head_revision()}): {url}")
    return EXIT_OK


def run_db_current(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from dicomnode.store import current_revision, head_revision

    try:
        engine, _settings = _engine(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    try:
        rev = current_revision(engine)
    except SQLAlchemyError as exc:
        _err(f"cannot read the database: {_one_line(exc)}")
        return EXIT_FAILURE
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if rev == head else f"behind (head {head}; run 'dicomnode db upgrade')"
    print(f"database at revision {rev or 'none'}: {state}")
    return EXIT_OK if rev == head else EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return text[:300]


# -- rules ----------------------------------------------------------------------------------------------


def run_rules_default(args: argparse.Namespace) -> int:
    from dicomnode.routing import default_rules_text

    sys.stdout.write(default_rules_text())
    return EXIT_OK


def summaries_from_path(path: Path) -> list[SeriesSummary]:
    """Series summaries of the DICOM files under ``path`` (headers only)."""
    import dataclasses

    from dicomnode.imaging.series import scan

    result = scan(path)
    for p, reason in result.unreadable:
        _err(f"skipped unreadable file {Path(p).name}: {reason}")
    out = []
    for sf in result.series:
        summary = sf.summary
        # Some writers leave SOPClassUID blank in the dataset (it is then only in the file meta).
        if not summary.get("SOPClassUID") and sf.instances and sf.instances[0].sop_class_uid:
            attrs = {**summary.attributes, "SOPClassUID": sf.instances[0].sop_class_uid}
            summary = dataclasses.replace(summary, attributes=attrs)
        out.append(summary)
    return out


def run_rules_explain(args: argparse.Namespace) -> int:
    from dicomnode.routing import explain, select

    try:
        settings, rules = load_config_and_rules(_config_path(args.config), args.rules)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    target = Path(args.target)
    try:
        if target.exists():
            summaries = summaries_from_path(target)
            if not summaries:
                _err(f"no DICOM series found under {target}")
                return EXIT_FAILURE
        else:
            summaries = _summaries_from_store(settings, args.target)
    except DicomnodeError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    decisions = select(summaries, rules, all_destinations=settings.destination_names)
    print(f"rules: {rules.source} ({rules.mode}); {len(summaries)} series")
    print(explain(decisions, summaries, verbose=not args.brief))
    return EXIT_OK


def _summaries_from_store(settings: Settings, study_uid: str) -> list[SeriesSummary]:
    from sqlalchemy.exc import SQLAlchemyError

    from dicomnode.errors import InputError
    from dicomnode.store import NotFoundError, Store, make_engine

    if not all(c.isdigit() or c == "." for c in study_uid):
        raise InputError(f"{study_uid}: neither an existing path nor a StudyInstanceUID")
    engine = make_engine(settings.database_url_resolved())
    try:
        return Store(engine).series_summaries(study_uid)
    except NotFoundError:
        raise InputError(f"study {study_uid} is not in the database") from None
    except SQLAlchemyError as exc:
        raise InputError(f"cannot read the database: {_one_line(exc)}") from None
    finally:
        engine.dispose()
