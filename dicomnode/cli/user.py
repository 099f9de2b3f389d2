"""``dicomnode user``: manage the admin UI's accounts without the UI (first admin, password resets).

* ``dicomnode user add NAME --role admin|viewer|sender [--password-stdin]``
* ``dicomnode user passwd NAME [--password-stdin]``
* ``dicomnode user list``: name, role, enabled, last log-in (login form, from the audit log), creation time
* ``dicomnode user disable NAME`` / ``dicomnode user enable NAME``

Every action takes ``--config FILE`` (default: ``$DICOMNODE_CONFIG``) and works on that node's database, which
must be migrated (``dicomnode db upgrade``; any node start does it too). Passwords are read from the terminal
(twice) or, with ``--password-stdin``, as one line from standard input (for scripts); never from the command
line, where other users of the machine could read them in the process list. Each change is written to the
audit log (actor ``cli:<login name>``), as changes made in the UI are.

Errors are one line on stderr with exit code 2 (unknown user, existing user, weak or empty password,
passwords that differ, unknown role, invalid config or unmigrated database); 1 when the database fails.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dicomnode.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dicomnode.store import Store
    from dicomnode.web.users import Role, UserStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    user: argparse.ArgumentParser = subparsers.add_parser(
        "user",
        help="admin UI accounts: add, passwd, list, disable, enable",
        description="Manage the accounts of the admin UI / REST API on this node's database "
        "(e.g. create the first admin, reset a password). Each change is audited.",
    )
    sub = user.add_subparsers(dest="user_command", metavar="ACTION")

    def action(name: str, help_text: str, *, named: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        if named:
            p.add_argument("name", help="user name")
        p.add_argument("--config", type=Path, help="config file (default: $DICOMNODE_CONFIG)")
        return p

    add = action("add", "create an account (password prompted twice, or --password-stdin)")
    # Checked by the handler, not argparse ``choices``: a wrong role is then one line, like the other errors.
    add.add_argument("--role", required=True, metavar="admin|viewer|sender", help="the account's role")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from standard input"
    )
    add.set_defaults(handler=run_add)
    pw = action("passwd", "set a new password (prompted twice, or --password-stdin)")
    pw.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from standard input"
    )
    pw.set_defaults(handler=run_passwd)
    action("list", "list the accounts: name, role, enabled, last log-in", named=False).set_defaults(
        handler=run_list
    )
    action("disable", "disable an account (it can no longer log in; kept for the audit trail)").set_defaults(
        handler=lambda a: run_set_enabled(a, False)
    )
    action("enable", "enable a disabled account again").set_defaults(
        handler=lambda a: run_set_enabled(a, True)
    )
    user.set_defaults(handler=lambda _a: _usage(user))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _err(msg: str) -> None:
    sys.stderr.write(f"dicomnode: {msg}\n")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]


def _actor() -> str:
    """Who made the change, for the audit log: ``cli:`` plus the operating-system login name."""
    try:
        return f"cli:{getpass.getuser()}"[:128]
    except (OSError, KeyError):  # no login name (some containers)
        return "cli"


@dataclass
class _Db:
    users: UserStore
    store: Store


@contextmanager
def _open(config: Path | None) -> Iterator[_Db]:
    """The node's users and store (``ConfigError`` for a bad config or an unmigrated database)."""
    from dicomnode.cli.admin import _config_path
    from dicomnode.config import load_settings
    from dicomnode.store import Store, make_engine
    from dicomnode.web.users import UserStore, ensure_users_table

    settings = load_settings(_config_path(config))
    engine = make_engine(settings.database_url_resolved())
    try:
        ensure_users_table(engine)
        yield _Db(UserStore(engine), Store(engine))
    finally:
        engine.dispose()


def _run(args: argparse.Namespace, body: Any) -> int:
    """Run ``body(db)`` with the one-line error handling shared by every action."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with _open(args.config) as db:
            rc: int = body(db)
            return rc
    except (ConfigError, InputError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except SQLAlchemyError as exc:
        _err(f"database error: {_one_line(exc)}")
        return EXIT_FAILURE


def read_password(from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at the terminal (not echoed).

    Raises
    ------
    InputError
        The two typed passwords differ, or there was nothing to read.
    """
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise InputError("no password on standard input")
        return line.removesuffix("\n").removesuffix("\r")
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Repeat the password: ")
    except EOFError:
        raise InputError("no password given (no terminal? use --password-stdin)") from None
    if first != second:
        raise InputError("the passwords do not match")
    return first


def run_add(args: argparse.Namespace) -> int:
    from dicomnode.web.users import ROLES

    def body(db: _Db) -> int:
        role = args.role.strip().lower()
        if role not in ROLES:
            raise InputError(f"unknown role {args.role!r}; use one of {', '.join(ROLES)}")
        name = args.name.strip()
        if db.users.exists(name):  # before the prompt: nobody types a password twice for nothing
            raise InputError(f"user {name!r} exists already (use 'dicomnode user passwd {name}')")
        user = db.users.create(name, read_password(args.password_stdin), cast("Role", role))
        db.store.audit(_actor(), "user.create", f"user:{user.username}", after={"role": role, "via": "cli"})
        print(f"user {user.username!r} created (role {user.role})")
        return EXIT_OK

    return _run(args, body)


def run_passwd(args: argparse.Namespace) -> int:
    def body(db: _Db) -> int:
        name = args.name.strip()
        if not db.users.exists(name):
            raise InputError(f"no user {name!r}")
        db.users.set_password(name, read_password(args.password_stdin))
        # Audited without the password, as the UI's changes are.
        db.store.audit(_actor(), "user.password", f"user:{name}", after={"password": "changed", "via": "cli"})
        print(f"password of {name!r} changed")
        return EXIT_OK

    return _run(args, body)


def run_set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    word = "enabled" if enabled else "disabled"

    def body(db: _Db) -> int:
        name = args.name.strip()
        if not db.users.set_enabled(name, enabled):
            print(f"user {name!r} is already {word}")
            return EXIT_OK
        db.store.audit(
            _actor(),
            "user.enable" if enabled else "user.disable",
            f"user:{name}",
            before={"enabled": not enabled},
            after={"enabled": enabled, "via": "cli"},
        )
        print(f"user {name!r} {word}")
        return EXIT_OK

    return _run(args, body)


def _fmt(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "never"


def run_list(args: argparse.Namespace) -> int:
    def body(db: _Db) -> int:
        rows = [("NAME", "ROLE", "ENABLED", "LAST LOGIN (UTC)", "CREATED (UTC)", "API TOKEN")]
        for a in db.users.accounts():
            rows.append(
                (
                    a.username,
                    a.role,
                    "yes" if a.enabled else "no",
                    _fmt(a.last_login),
                    _fmt(a.created_at),
                    "yes" if a.has_token else "no",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if len(rows) == 1:
            print("(no users yet: 'dicomnode user add NAME --role admin', or start the node once)")
        return EXIT_OK

    return _run(args, body)
