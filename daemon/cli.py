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


def cmd_worker(args: argparse.Namespace) -> int:
    """Workers only (no receiver): more hosts join one PostgreSQL queue this way."""
    import signal
    import threading

    from daemon.worker.process import WorkerPool

    settings = _settings(args)
    count = args.processes if args.processes is not None else max(settings.queue.workers, 1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    pool = WorkerPool(settings, count)
    pool.start()
    while not done.wait(1.0):
        if not pool.alive():
            break
    pool.stop()
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from daemon.db import queue
    from daemon.db.models import JobState
    from daemon.service import open_database

    db = open_database(_settings(args), upgrade=False)
    now = datetime.now(UTC)
    try:
        if args.action == "list":
            states = [JobState(s) for s in args.state] if args.state else None
            with db.read() as session:
                jobs = queue.list_jobs(session, states, args.limit)
                rows = [
                    {
                        "id": j.id,
                        "kind": j.kind,
                        "state": j.state.value,
                        "attempts": j.attempts,
                        "instance": j.instance_pk,
                        "updated": j.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                        "last_error": (j.last_error or "").splitlines()[0][:80]
                        if j.last_error
                        else "",
                    }
                    for j in jobs
                ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(
                    f"{'id':>6} {'kind':<8} {'state':<15} {'try':>3}  {'updated':<19}  last error"
                )
                for r in rows:
                    print(
                        f"{r['id']:>6} {r['kind']:<8} {r['state']:<15} {r['attempts']:>3}  "
                        f"{r['updated']:<19}  {r['last_error']}"
                    )
        elif args.action in ("retry", "cancel"):
            if not args.ids:
                raise UsfmdError(f"jobs {args.action} needs one or more job ids")
            act = queue.retry if args.action == "retry" else queue.cancel
            changed = act(db, args.ids, now)
            print(f"{args.action}: {changed} of {len(args.ids)} job(s) changed")
        elif args.action == "probe":
            from daemon.worker.handlers import PROBE

            with db.write() as session:
                for _ in range(args.count):
                    params = {"seconds": args.seconds, "fail_times": args.fail_times}
                    queue.enqueue(session, PROBE, now, params=params)
            print(f"queued {args.count} probe job(s)")
    finally:
        db.dispose()
    return 0


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

    worker = sub.add_parser("worker", help="run worker processes only (scale-out hosts)")
    worker.add_argument("--processes", type=int, help="default: queue.workers (at least 1)")
    worker.set_defaults(func=cmd_worker)

    jobs = sub.add_parser("jobs", help="inspect and act on queued work")
    jobs.add_argument("action", choices=["list", "retry", "cancel", "probe"])
    jobs.add_argument("ids", nargs="*", type=int, help="job ids for retry/cancel")
    jobs.add_argument("--state", action="append", help="list: filter by state (repeatable)")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument("--count", type=int, default=1, help="probe: number of jobs")
    jobs.add_argument("--seconds", type=float, default=0.0, help="probe: work time per job")
    jobs.add_argument("--fail-times", type=int, default=0, help="probe: failing first attempts")
    jobs.set_defaults(func=cmd_jobs)

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
