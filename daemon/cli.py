"""The ``usfmd`` command: serve, db, status, echo, config."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime

from daemon import __version__
from daemon.config import Settings, load_settings
from daemon.errors import UsfmdError
from daemon.logs import configure_logging

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.json_format)
    return settings


def _timestamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _first_line(error: str | None, width: int = 80) -> str:
    """An error's first line, cut to a table column (the full text stays in the database)."""
    return error.splitlines()[0][:width] if error else ""


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
    from daemon.dispatch import outbox
    from daemon.service import open_database

    db = open_database(_settings(args), upgrade=False)
    try:
        with db.read() as session:
            report = counts(session)
            report["outbox"] = outbox.counts(session)
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
    if count == 0 and not args.dispatch:
        raise UsfmdError("worker --processes 0 runs nothing; add --dispatch to only send results")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    dispatcher = None
    if args.dispatch:
        # Sending from worker hosts too: the per-destination limit is kept in the database.
        from daemon.dispatch.dispatcher import Dispatcher
        from daemon.service import open_archive, open_database

        dispatcher = Dispatcher(settings, open_database(settings), open_archive(settings).root)
        dispatcher.start()
    pool = WorkerPool(settings, count)
    pool.start()
    while not done.wait(1.0):
        if count and not pool.alive():
            break
    pool.stop()
    if dispatcher is not None:
        dispatcher.stop()
        dispatcher.db.dispose()
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
                        "updated": _timestamp(j.updated_at),
                        "last_error": _first_line(j.last_error),
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


def cmd_outbox(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from daemon.db.models import OutboxState
    from daemon.dispatch import outbox
    from daemon.service import open_database

    settings = _settings(args)
    try:
        states = [OutboxState(s) for s in args.state] if args.state else None
    except ValueError as exc:
        raise UsfmdError(f"{exc}; states: {[s.value for s in OutboxState]}") from None
    if args.destination and settings.dispatch.destination(args.destination) is None:
        known = [d.name for d in settings.dispatch.destinations]
        print(f"note: {args.destination!r} is not configured (configured: {known})")
    db = open_database(settings, upgrade=False)
    now = datetime.now(UTC)
    try:
        if args.action == "list":
            with db.read() as session:
                items = outbox.list_items(session, states, args.destination, args.limit)
                rows = [
                    {
                        "id": i.id,
                        "destination": i.destination,
                        "state": i.state.value,
                        "attempts": i.attempts,
                        "status": None if i.last_status is None else f"0x{i.last_status:04X}",
                        "sop_instance_uid": i.sop_instance_uid,
                        "updated": _timestamp(i.updated_at),
                        "next_attempt": _timestamp(i.not_before),
                        "last_error": _first_line(i.last_error),
                    }
                    for i in items
                ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(
                    f"{'id':>6} {'destination':<16} {'state':<9} {'try':>3} {'status':<6}  "
                    f"{'updated':<19}  last error"
                )
                for r in rows:
                    print(
                        f"{r['id']:>6} {r['destination']:<16} {r['state']:<9} {r['attempts']:>3} "
                        f"{r['status'] or '-':<6}  {r['updated']:<19}  {r['last_error']}"
                    )
        elif args.action == "retry":
            changed = outbox.retry(db, now, args.ids, args.destination, states)
            print(f"retry: {changed} row(s) back in line")
        elif args.action == "cancel":
            changed = outbox.cancel(db, now, args.ids, args.destination)
            print(f"cancel: {changed} row(s) cancelled")
    finally:
        db.dispose()
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    """``usfmd models train-demo``: a synthetic demo model from phantoms (no config, no DB)."""
    from training.demo import DemoConfig, format_metrics, train_demo

    if not args.out:
        raise UsfmdError("models train-demo needs --out PATH for the model file")
    given = {
        "task": args.task,
        "train": args.train,
        "val": args.val,
        "test": args.test,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
    }
    try:
        config = DemoConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise UsfmdError(str(exc)) from None
    print(
        f"training a synthetic demo model for {config.task} on phantoms "
        f"({config.train}/{config.val}/{config.test} train/val/test, {config.epochs} epochs)"
    )
    result = train_demo(
        config,
        args.out,
        on_epoch=lambda e: print(
            f"epoch {e.epoch + 1:>3}: train loss {e.train_loss:.4f}  val loss {e.val_loss:.4f}  "
            f"val acc {e.val_accuracy:.4f}  ({e.seconds:.1f} s){'  *' if e.best else ''}",
            flush=True,
        ),
    )
    print(f"held-out test phantoms:\n{format_metrics(result.test)}")
    print(
        f"wrote {result.path} (sha256 {result.sha256[:16]}..., synthetic) "
        f"in {result.seconds:.0f} s (phantoms {result.data_seconds:.0f} s, "
        f"training {result.train_seconds:.0f} s)\n"
        f"import it with: usfmd models import {result.path} --version demo-1 --synthetic\n"
        f'(its Algorithm Name, from the file: "{result.algorithm_name}")'
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.models import registry
    from daemon.service import open_database

    if args.action == "train-demo":
        return cmd_train_demo(args)
    settings = _settings(args)
    db = open_database(settings, upgrade=False)
    try:
        if args.action == "import":
            if not args.target or not args.version:
                raise UsfmdError("models import needs a model file and --version")
            metrics = None
            if args.metrics:
                try:
                    with open(args.metrics, encoding="utf-8") as handle:
                        metrics = json.load(handle)
                except (OSError, ValueError) as exc:
                    raise UsfmdError(f"--metrics {args.metrics!r}: {exc}") from None
                if not isinstance(metrics, dict):
                    raise UsfmdError(f"--metrics {args.metrics!r} must hold a JSON object")
            with db.write() as session:
                row = registry.import_model(
                    session,
                    args.target,
                    version=args.version,
                    synthetic=args.synthetic,
                    metrics=metrics,
                    data_dir=settings.storage.data_dir,
                    algorithm_name=args.algorithm_name,
                )
                done = (
                    registry.activate(session, row.id, allow_synthetic=args.allow_synthetic)
                    if args.activate
                    else None
                )
                shown = registry.describe(row)
            print(
                f"imported {shown['task']}:{shown['version']} as id {shown['id']} "
                f"(sha256 {shown['sha256'][:16]}..., Device UID {shown['device_uid']})"
            )
            if done is not None:
                print(f"activated; {done.requeued} analyze job(s) requeued")
        elif args.action == "list":
            with db.read() as session:
                rows = [registry.describe(r) for r in registry.list_versions(session, args.task)]
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            print(
                f"{'id':>4} {'task':<18} {'version':<16} {'act':<3} {'syn':<3} "
                f"{'encoder':<18} created"
            )
            for r in rows:
                print(
                    f"{r['id']:>4} {r['task']:<18} {r['version']:<16} "
                    f"{'*' if r['active'] else '':<3} {'yes' if r['synthetic'] else '':<3} "
                    f"{r['encoder']:<18} {r['created_at'][:19]}"
                )
        elif args.action == "show":
            if not args.target:
                raise UsfmdError("models show needs an id or task:version")
            with db.read() as session:
                shown = registry.describe(registry.get_version(session, args.target))
            if args.json:
                print(json.dumps(shown, indent=2))
                return 0
            for key, value in shown.items():
                text = json.dumps(value) if isinstance(value, dict | list) else value
                print(f"{key:<15} {text}")
        elif args.action == "activate":
            if not args.target:
                raise UsfmdError("models activate needs an id or task:version")
            with db.write() as session:
                done = registry.activate(session, args.target, allow_synthetic=args.allow_synthetic)
            before = ", ".join(str(i) for i in done.previous) or "none"
            print(
                f"activated id {done.version_id} for {done.task} (previously active: {before}); "
                f"{done.requeued} analyze job(s) requeued"
            )
        elif args.action == "deactivate":
            if not args.target:
                raise UsfmdError("models deactivate needs an id or task:version")
            with db.write() as session:
                version_id = registry.deactivate(session, args.target)
                task = registry.get_version(session, version_id).task
            print(
                f"deactivated id {version_id}: {task} has no active model; its analyses will "
                "wait for one"
            )
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
    worker.add_argument(
        "--dispatch", action="store_true", help="also send queued results (outbox) from here"
    )
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

    box = sub.add_parser("outbox", help="results queued for the destinations (C-STORE)")
    box.add_argument("action", choices=["list", "retry", "cancel"])
    box.add_argument("ids", nargs="*", type=int, help="outbox row ids for retry/cancel")
    box.add_argument("--destination", help="only this destination (retry/cancel: all its rows)")
    box.add_argument(
        "--state", action="append", help="filter by state (repeatable); retry of sent = re-send"
    )
    box.add_argument("--limit", type=int, default=50)
    box.add_argument("--json", action="store_true")
    box.set_defaults(func=cmd_outbox)

    models = sub.add_parser(
        "models", help="model registry: import, list, show, activate, deactivate"
    )
    models.add_argument(
        "action", choices=["import", "list", "show", "activate", "deactivate", "train-demo"]
    )
    models.add_argument(
        "target", nargs="?", help="import: model file; show/activate: id or task:version"
    )
    models.add_argument("--version", help="import: version label, unique per task")
    models.add_argument("--synthetic", action="store_true", help="import: trained on phantoms")
    models.add_argument("--algorithm-name", help="import: TID 4019 Algorithm Name")
    models.add_argument("--metrics", help="import: JSON file with evaluation metrics")
    models.add_argument("--activate", action="store_true", help="import: activate it too")
    models.add_argument(
        "--allow-synthetic", action="store_true", help="activate a synthetic version anyway"
    )
    models.add_argument(
        "--task", help="list: only this task; train-demo: heart_view (default) or ventriculomegaly"
    )
    models.add_argument("--json", action="store_true")
    # train-demo: a tiny ViT trained on phantoms, marked synthetic (training/demo.py).
    models.add_argument("--out", help="train-demo: where to write the model file")
    for name, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        models.add_argument(f"--{name}", type=int, help=f"train-demo: {what} phantoms")
    models.add_argument("--epochs", type=int, help="train-demo: epochs")
    models.add_argument("--seed", type=int, help="train-demo: seed of phantoms and training")
    models.add_argument("--threads", type=int, help="train-demo: CPU threads (default: torch's)")
    models.set_defaults(func=cmd_models)

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
