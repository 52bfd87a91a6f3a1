"""The ``usfmd`` command: serve, db, status, echo, config."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from daemon import __version__
from daemon.config import Settings, load_settings
from daemon.errors import UsfmdError
from daemon.logs import configure_logging

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.json_format)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.service import Daemon

    Daemon(_settings(args)).run_forever()
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from daemon.db import migrate
    from daemon.service import open_database

    db = open_database(_settings(args), upgrade=False)
    try:
        if args.action == "upgrade":
            migrate.upgrade(db.engine, args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                raise UsfmdError("db downgrade needs a revision (e.g. 'base' or '0001')")
            migrate.downgrade(db.engine, args.revision)
        current, head = migrate.current_revision(db.engine), migrate.head_revision(db.engine)
        print(f"revision: {current} (head {head})")
    finally:
        db.dispose()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.db.studies import counts
    from daemon.service import open_database

    db = open_database(_settings(args), upgrade=False)
    try:
        with db.read() as session:
            report = counts(session)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for section, values in report.items():
        print(f"{section}:")
        if not values:
            print("  (none)")
        for key, value in sorted(values.items()):
            print(f"  {key:<16} {value}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from daemon.echo import echo

    match = _PEER.match(args.peer)
    if not match:
        raise UsfmdError(f"peer {args.peer!r} must look like AE@host:port, e.g. PACS@127.0.0.1:104")
    settings = _settings(args)
    calling = args.calling_ae or settings.dicom.ae_title
    code, elapsed = echo(
        calling, match["ae"], match["host"].strip("[]"), int(match["port"]), timeout=args.timeout
    )
    print(f"C-ECHO {args.peer}: status 0x{code:04X} in {elapsed * 1000:.1f} ms")
    return 0 if code == 0 else 1


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "show":
        print(json.dumps(settings.model_dump(mode="json", by_alias=True), indent=2))
    else:
        print("configuration is valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usfmd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"usfmd {__version__}")
    parser.add_argument("-c", "--config", help="TOML configuration file (default: $USFMD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="receive studies and run the pipeline").set_defaults(
        func=cmd_serve
    )

    db = sub.add_parser("db", help="database schema migrations")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?", help="target revision (default head for upgrade)")
    db.set_defaults(func=cmd_db)

    status = sub.add_parser("status", help="studies, instances and jobs by state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    echo = sub.add_parser("echo", help="C-ECHO a peer: usfmd echo AE@host:port")
    echo.add_argument("peer")
    echo.add_argument("--calling-ae", help="our AE title (default dicom.ae_title)")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.set_defaults(func=cmd_echo)

    config = sub.add_parser("config", help="validate or print the effective configuration")
    config.add_argument("action", choices=["check", "show"])
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsfmdError as exc:
        print(f"usfmd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
