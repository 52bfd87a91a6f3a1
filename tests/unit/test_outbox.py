"""Outbox, result storage and loop guard on both backends; status judgement and contexts.

Time is passed in explicitly (T0 + n seconds), so leases, back-off and expiry are exact.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from sqlalchemy import func, select

from daemon.cli import main
from daemon.config import load_settings
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.index import InstanceHeader, record_instance
from daemon.db.models import Instance, OutboxItem, OutboxState, OutputInstance, Study, StudyState
from daemon.dispatch import outbox, scu
from daemon.dispatch.outbox import ClaimedItem, Delivery, RetryPolicy
from daemon.dispatch.results import store_result
from daemon.errors import ConfigError, ConformanceError, UsfmdError
from daemon.receive.archive import Archive

from dispatch_peers import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, make_sc, make_sr

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
LEASE = 60.0
POLICY = RetryPolicy(max_attempts=3, backoff_base=10, backoff_max=25)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive(tmp_path / "archive", tmp_path / "quarantine", tmp_path / "archive/.in", 0)


def results(db: Database, archive: Archive, count: int, destinations=("pacs",)) -> list[str]:
    study = generate_uid()
    return [
        store_result(db, archive, make_sc(study), list(destinations), T0).sop_instance_uid
        for _ in range(count)
    ]


def claim(db: Database, owner: str, now: datetime, limit: int = 10, slots: int = 2):
    return outbox.claim(
        db,
        "pacs",
        owner,
        now,
        lease_seconds=LEASE,
        max_associations=slots,
        limit=limit,
        policy=POLICY,
    )


def row(db: Database, item_id: int) -> OutboxItem:
    with db.read() as session:
        found = session.get(OutboxItem, item_id)
        assert found is not None
        return found


def rows(db: Database) -> list[OutboxItem]:
    with db.read() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


# -- results: archived, indexed, never a second UID -------------------------------------------


def test_store_result_is_durable_indexed_and_idempotent(db: Database, archive: Archive) -> None:
    sc = make_sc()
    first = store_result(db, archive, sc, ["pacs", "viewer"], T0)
    assert first.created and first.queued == ("pacs", "viewer")
    on_disk = archive.absolute(first.path)
    stored = pydicom.dcmread(on_disk)
    assert stored.SOPInstanceUID == sc.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID
    assert not list(on_disk.parent.glob(".*.tmp")), "temporary file left behind"
    before = on_disk.read_bytes()

    again = store_result(db, archive, sc, ["pacs", "viewer"], at(5))
    assert (again.created, again.queued, again.instance_pk) == (False, (), first.instance_pk)
    assert on_disk.read_bytes() == before
    with db.read() as session:
        instance = session.get_one(Instance, first.instance_pk)
        assert instance.analysable is False
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(OutputInstance)) == 1
    assert [(r.destination, r.state) for r in rows(db)] == [
        ("pacs", OutboxState.PENDING),
        ("viewer", OutboxState.PENDING),
    ]
    # A destination added later gets the same object queued, nothing else changes.
    later = store_result(db, archive, sc, ["pacs", "viewer", "archive2"], at(6))
    assert later.queued == ("archive2",) and len(rows(db)) == 3


def test_result_key_returns_the_first_object_not_a_new_uid(db: Database, archive: Archive) -> None:
    study = generate_uid()
    first = store_result(db, archive, make_sc(study), ["pacs"], T0, key=f"sc/{study}/v1")
    # The job ran again and built a new dataset (new UIDs) for the same result.
    rerun = store_result(db, archive, make_sc(study), ["pacs"], at(1), key=f"sc/{study}/v1")
    assert rerun.sop_instance_uid == first.sop_instance_uid and not rerun.created
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert len(list(archive.root.rglob("*.dcm"))) == 1
    other = store_result(db, archive, make_sc(study), ["pacs"], at(2), key=f"sc/{study}/v2")
    assert other.created and other.sop_instance_uid != first.sop_instance_uid


def test_store_result_refuses_objects_without_our_manufacturer(
    db: Database, archive: Archive
) -> None:
    with pytest.raises(ConformanceError, match="Manufacturer 'ACME'.*'usfmd'"):
        store_result(db, archive, make_sc(manufacturer="ACME"), ["pacs"], T0)
    assert not list(archive.root.rglob("*.dcm"))


def test_result_does_not_reopen_its_stable_study(db: Database, archive: Archive) -> None:
    source = make_sc(manufacturer="usfmd-phantom")
    header = InstanceHeader.from_dataset(source, ExplicitVRLittleEndian)
    with db.write() as session:
        record_instance(session, header, path="x.dcm", size_bytes=1, calling_ae="US1", now=T0)
        session.execute(Study.__table__.update().values(state=StudyState.STABLE))
    store_result(db, archive, make_sr(source), ["pacs"], at(30))
    with db.read() as session:
        study = session.scalars(select(Study)).one()
        assert (study.state, study.calling_ae, study.last_received_at) == (
            StudyState.STABLE,
            "US1",
            T0,
        )


# -- loop guard: where `analysable` is decided ----------------------------------------------


@pytest.mark.parametrize(
    ("manufacturer", "contributing", "ours"),
    [
        ("usfmd", None, True),
        (" USFMD ", None, True),  # a PACS may change case or padding
        ("usfmd-phantom", None, False),  # the phantom scanner is a different name
        ("GE Healthcare", None, False),
        ("GE Healthcare", "usfmd", True),  # derived from one of our results
        ("GE Healthcare", "Other AI", False),
    ],
)
def test_loop_guard_by_manufacturer(
    manufacturer: str, contributing: str | None, ours: bool
) -> None:
    ds = make_sc(manufacturer=manufacturer, contributing=contributing)
    header = InstanceHeader.from_dataset(ds, ExplicitVRLittleEndian)
    assert header.produced_by_us is ours
    assert header.analysable is (not ours)  # a Secondary Capture is analysable otherwise


def test_record_instance_never_analyses_a_recorded_result_uid(
    db: Database, archive: Archive
) -> None:
    """Our result comes back with its Manufacturer coerced and no index row of that UID (e.g.
    the index was restored from an older backup): the recorded UID alone keeps it out."""
    ours = make_sc()
    stored = store_result(db, archive, ours, [], T0)
    with db.write() as session:
        session.execute(Instance.__table__.update().values(sop_instance_uid=generate_uid()))
    back = pydicom.dcmread(archive.absolute(stored.path))
    back.Manufacturer = "PACS-COERCED"  # the header alone would let it through
    header = InstanceHeader.from_dataset(back, ExplicitVRLittleEndian)
    assert header.analysable
    control = InstanceHeader.from_dataset(make_sc(manufacturer="US1"), ExplicitVRLittleEndian)
    with db.write() as session:
        assert record_instance(session, header, path="b.dcm", size_bytes=1, calling_ae="P", now=T0)
        assert record_instance(session, control, path="c.dcm", size_bytes=1, calling_ae="P", now=T0)
    with db.read() as session:
        flags = dict(session.execute(select(Instance.path, Instance.analysable)).all())
    assert flags["b.dcm"] is False and flags["c.dcm"] is True


# -- the outbox: claim, lease, limit, record, back-off ----------------------------------------


def test_enqueue_is_idempotent_per_destination(db: Database, archive: Archive) -> None:
    (uid,) = results(db, archive, 1)
    with db.write() as session:
        pk = session.scalar(select(Instance.id))
        assert outbox.enqueue(session, pk, uid, ["pacs", "pacs", "viewer"], T0) == ["viewer"]
        assert outbox.enqueue(session, pk, uid, ["pacs", "viewer"], T0) == []
    assert sorted(r.destination for r in rows(db)) == ["pacs", "viewer"]


def test_claim_leases_a_batch_and_counts_the_attempt(db: Database, archive: Archive) -> None:
    uids = results(db, archive, 3)
    batch = claim(db, "host-a:1:pacs:0", T0, limit=2)
    assert [i.sop_instance_uid for i in batch] == uids[:2]
    assert batch[0].sop_class_uid == SECONDARY_CAPTURE
    assert batch[0].transfer_syntax_uid == ExplicitVRLittleEndian
    assert batch[0].attempts == 1 and batch[0].path.endswith(f"{uids[0]}.dcm")
    first = row(db, batch[0].id)
    assert (first.state, first.lease_owner) == (OutboxState.SENDING, "host-a:1:pacs:0")
    assert first.lease_expires_at == at(LEASE)
    # Another association gets the rest, never the same objects.
    assert [i.sop_instance_uid for i in claim(db, "host-b:7:pacs:0", T0)] == uids[2:]
    assert claim(db, "host-c:1:pacs:0", T0) == []


def test_at_most_max_associations_hold_a_destination(db: Database, archive: Archive) -> None:
    results(db, archive, 6)
    assert len(claim(db, "a:0", T0, limit=2, slots=2)) == 2
    assert len(claim(db, "b:0", T0, limit=2, slots=2)) == 2
    assert claim(db, "c:0", T0, limit=2, slots=2) == [], "a third association was allowed"
    # When one association finishes, its slot is free for another owner.
    done = [i for i in rows(db) if i.lease_owner == "a:0"]
    items = [ClaimedItem(r.id, "pacs", r.sop_instance_uid, "", "", "", 1) for r in done]
    outbox.record(db, "a:0", [Delivery(i, True, 0) for i in items], at(1), POLICY, LEASE)
    assert len(claim(db, "c:0", at(1), limit=2, slots=2)) == 2
    # An expired lease does not count: its association is presumed dead.
    assert len(claim(db, "d:0", at(LEASE + 1), limit=2, slots=2)) >= 1


def test_limit_holds_when_processes_race(db_url: str, archive: Archive) -> None:
    """Eight claimers with their own engines (as separate processes or hosts would have)."""
    engines = [Database(db_url) for _ in range(8)]
    migrate.upgrade(engines[0].engine)
    try:
        results(engines[0], archive, 16)
        owners: list[str] = []
        errors: list[BaseException] = []
        start = threading.Barrier(len(engines))

        def race(index: int) -> None:
            try:
                start.wait()
                if claim(engines[index], f"host{index}:0", T0, limit=2, slots=3):
                    owners.append(f"host{index}:0")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(engines))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(owners) == 3, owners
        with engines[0].read() as session:
            holders = session.scalar(
                select(func.count(func.distinct(OutboxItem.lease_owner))).where(
                    OutboxItem.state == OutboxState.SENDING
                )
            )
        assert holders == 3
    finally:
        for engine in engines:
            engine.dispose()


def test_record_success_warning_failure_and_dead_letter(db: Database, archive: Archive) -> None:
    results(db, archive, 3)
    ok, warned, refused = claim(db, "a:0", T0, limit=3)
    outbox.record(
        db,
        "a:0",
        [
            Delivery(ok, True, 0x0000),
            Delivery(warned, True, 0xB000),
            Delivery(refused, False, 0xA700, "status 0xA700 (Failure: Refused: Out of Resources)"),
        ],
        at(1),
        POLICY,
        LEASE,
    )
    assert (row(db, ok.id).state, row(db, ok.id).sent_at) == (OutboxState.SENT, at(1))
    assert (row(db, warned.id).state, row(db, warned.id).last_status) == (OutboxState.SENT, 0xB000)
    failed = row(db, refused.id)
    assert (failed.state, failed.last_status, failed.lease_owner) == (
        OutboxState.FAILED,
        0xA700,
        None,
    )
    assert "0xA700" in (failed.last_error or "")
    assert failed.not_before == at(1 + 10)  # back-off base after the first attempt

    # Not due before its back-off; then 2nd attempt fails (20 s), 3rd is the last: dead.
    assert claim(db, "a:0", at(10)) == []
    for attempt, (now, delay) in enumerate([(11, 20), (31, None)], start=2):
        (again,) = claim(db, "a:0", at(now))
        assert again.attempts == attempt
        outbox.record(
            db, "a:0", [Delivery(again, False, None, "no response")], at(now), POLICY, LEASE
        )
        state = row(db, refused.id)
        if delay is None:
            assert state.state == OutboxState.DEAD
        else:
            assert (state.state, state.not_before) == (OutboxState.FAILED, at(now + delay))
    assert claim(db, "a:0", at(10_000)) == []


def test_backoff_is_capped(db: Database, archive: Archive) -> None:
    policy = RetryPolicy(max_attempts=10, backoff_base=10, backoff_max=25)
    results(db, archive, 1)
    delays = []
    now = T0
    for _ in range(4):
        (item,) = outbox.claim(
            db, "pacs", "a:0", now, lease_seconds=LEASE, max_associations=1, limit=1, policy=policy
        )
        outbox.record(db, "a:0", [Delivery(item, False, None, "down")], now, policy, LEASE)
        nxt = row(db, item.id).not_before
        delays.append((nxt - now).total_seconds())
        now = nxt
    assert delays == [10, 20, 25, 25]


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_record(
    db: Database, archive: Archive
) -> None:
    results(db, archive, 1)
    (item,) = claim(db, "crashed:0", T0)
    assert claim(db, "other:0", at(LEASE - 1)) == []
    (taken,) = claim(db, "other:0", at(LEASE + 1))
    assert (taken.id, taken.attempts) == (item.id, 2)
    late = outbox.record(db, "crashed:0", [Delivery(item, True, 0)], at(LEASE + 2), POLICY, LEASE)
    assert late == 0 and row(db, item.id).lease_owner == "other:0"
    # The last allowed attempt's lease expires: dead, with the reason.
    assert len(claim(db, "third:0", at(3 * LEASE))) == 1
    assert claim(db, "fourth:0", at(5 * LEASE)) == []
    dead = row(db, item.id)
    assert dead.state == OutboxState.DEAD and "lease expired" in (dead.last_error or "")


def test_record_renews_the_lease_of_the_rest_of_the_batch(db: Database, archive: Archive) -> None:
    results(db, archive, 2)
    first, second = claim(db, "a:0", T0)
    outbox.record(db, "a:0", [Delivery(first, True, 0)], at(50), POLICY, LEASE)
    assert row(db, second.id).lease_expires_at == at(50 + LEASE)


def test_release_gives_objects_back_without_counting(db: Database, archive: Archive) -> None:
    results(db, archive, 2)
    batch = claim(db, "a:0", T0)
    assert outbox.release(db, "a:0", [i.id for i in batch], at(1)) == 2
    assert [(r.state, r.attempts, r.lease_owner) for r in rows(db)] == [
        (OutboxState.PENDING, 0, None)
    ] * 2
    assert outbox.release(db, "b:0", [batch[0].id], at(1)) == 0  # not the owner


def test_operator_retry_and_cancel(db: Database, archive: Archive) -> None:
    results(db, archive, 3)
    a, b, c = claim(db, "a:0", T0)
    outbox.record(
        db,
        "a:0",
        [Delivery(a, True, 0), Delivery(b, False, 0xC000, "x"), Delivery(c, False, None, "y")],
        T0,
        RetryPolicy(1, 1, 1),
        LEASE,
    )
    assert [r.state for r in rows(db)] == [OutboxState.SENT, OutboxState.DEAD, OutboxState.DEAD]
    with pytest.raises(UsfmdError, match="ids or a destination"):
        outbox.retry(db, at(1))
    # By destination: dead/failed/cancelled only; a sent object is re-sent only when named.
    assert outbox.retry(db, at(1), destination="pacs") == 2
    assert rows(db)[0].state == OutboxState.SENT
    assert outbox.retry(db, at(2), ids=[a.id]) == 1
    assert [(r.state, r.attempts, r.last_error) for r in rows(db)] == [
        (OutboxState.PENDING, 0, None)
    ] * 3
    assert outbox.cancel(db, at(3), ids=[b.id]) == 1
    assert row(db, b.id).state == OutboxState.CANCELLED
    assert [i.id for i in claim(db, "a:0", at(4))] == [a.id, c.id]
    with pytest.raises(UsfmdError, match="cannot retry"):
        outbox.retry(db, at(5), destination="pacs", states=[OutboxState.SENDING])


# -- what the SCU proposes and how it judges answers --------------------------------------------


@pytest.mark.parametrize(
    ("status", "accepted"),
    [
        (0x0000, True),
        (0xB000, True),  # PS3.4 Table B.2-1 warnings: stored
        (0xB007, True),
        (0xB006, True),
        (0xA700, False),
        (0xA7FF, False),
        (0xA900, False),
        (0xC000, False),
        (0xC123, False),
        (0x0110, False),
        (0x0122, False),
        (0xB001, False),  # not a C-STORE warning
        (0xFE00, False),
        (None, False),
    ],
)
def test_judge_store_response(status: int | None, accepted: bool) -> None:
    ok, error = scu.judge(status)
    assert ok is accepted
    assert (error is None) is accepted
    if status is not None and not accepted:
        assert f"0x{status:04X}" in (error or "")


def _item(sop_class: str, syntax: str, n: int = 0) -> ClaimedItem:
    return ClaimedItem(n, "pacs", generate_uid(), sop_class, syntax, "x.dcm", 1)


def test_contexts_from_each_file_plus_uncompressed_fallback() -> None:
    contexts = scu.proposed_contexts(
        [
            _item(SECONDARY_CAPTURE, JPEGBaseline8Bit),
            _item(SECONDARY_CAPTURE, ExplicitVRLittleEndian),
            _item(SECONDARY_CAPTURE, JPEGBaseline8Bit),
            _item(COMPREHENSIVE_3D_SR, ExplicitVRLittleEndian),
        ]
    )
    shown = [(c.abstract_syntax, tuple(c.transfer_syntax)) for c in contexts]
    assert shown == [
        (SECONDARY_CAPTURE, (JPEGBaseline8Bit,)),
        (SECONDARY_CAPTURE, (ExplicitVRLittleEndian,)),
        (COMPREHENSIVE_3D_SR, (ExplicitVRLittleEndian,)),
        (SECONDARY_CAPTURE, scu.FALLBACK_SYNTAXES),
        (COMPREHENSIVE_3D_SR, scu.FALLBACK_SYNTAXES),
    ]


def test_too_many_contexts_is_refused() -> None:
    items = [_item(f"1.2.3.{n}", ExplicitVRLittleEndian, n) for n in range(65)]
    with pytest.raises(ValueError, match="at most 128"):
        scu.proposed_contexts(items)


# -- configuration ------------------------------------------------------------------------------


def _destination(**extra: object) -> dict[str, object]:
    return {"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 104, **extra}


@pytest.mark.parametrize(
    ("dispatch", "message"),
    [
        ({"destinations": [_destination(), _destination()]}, "'pacs' is used twice"),
        ({"destinations": [_destination(name="has space")]}, "destinations.0.name"),
        ({"destinations": [_destination(ae_title="X" * 17)]}, "at most 16"),
        ({"destinations": [_destination(max_associations=0)]}, "max_associations"),
        ({"lease_seconds": 60}, "lease_seconds"),
        (
            {"destinations": [_destination(tls={"enabled": True, "certificate": "/x.pem"})]},
            "go together",
        ),
        (
            {"destinations": [_destination(tls={"enabled": True, "ca_certificates": "/no.pem"})]},
            "does not exist",
        ),
    ],
)
def test_dispatch_config_errors_name_the_key(dispatch: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, dispatch=dispatch)


def test_destinations_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "USFMD_DISPATCH__DESTINATIONS",
        json.dumps([_destination(max_associations=4), _destination(name="b", enabled=False)]),
    )
    settings = load_settings()
    assert [(d.name, d.max_associations, d.enabled) for d in settings.dispatch.destinations] == [
        ("pacs", 4, True),
        ("b", 2, False),
    ]
    assert settings.dispatch.destination("b") is not None


# -- the outbox commands ------------------------------------------------------------------------


def test_outbox_cli_list_retry_cancel_and_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USFMD_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("USFMD_DISPATCH__DESTINATIONS", json.dumps([_destination()]))
    assert main(["db", "upgrade"]) == 0
    settings = load_settings()
    db = Database(settings.database_url)
    archive = Archive(settings.storage.archive, tmp_path / "q", settings.storage.incoming, 0)
    try:
        results(db, archive, 2)
        (item, _) = claim(db, "a:0", T0)
        outbox.record(
            db,
            "a:0",
            [Delivery(item, False, 0xA900, "status 0xA900")],
            T0,
            RetryPolicy(1, 1, 1),
            LEASE,
        )
    finally:
        db.dispose()
    capsys.readouterr()

    assert main(["outbox", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["state"], r["status"]) for r in listed] == [("sending", None), ("dead", "0xA900")]
    assert listed[1]["last_error"] == "status 0xA900"
    assert main(["outbox", "list", "--state", "dead"]) == 0
    text = capsys.readouterr().out
    assert "dead" in text and "sending" not in text

    assert main(["outbox", "retry"]) == 2
    assert "ids or a destination" in capsys.readouterr().err
    assert main(["outbox", "retry", str(item.id)]) == 0
    assert "1 row(s)" in capsys.readouterr().out
    assert main(["outbox", "cancel", "--destination", "pacs"]) == 0
    assert "2 row(s) cancelled" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outbox"] == {"cancelled": 2}
    assert main(["worker", "--processes", "0"]) == 2
    assert "add --dispatch" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_store_result_refuses_invalid_uids(db: Database, archive: Archive) -> None:
    sc = make_sc()
    sc.SOPInstanceUID = "1.2.abc"
    with pytest.raises(ConformanceError, match="SOPInstanceUID '1.2.abc' is not a valid UID"):
        store_result(db, archive, sc, ["pacs"], T0)
    assert not list(archive.root.rglob("*.dcm"))


def test_store_result_refuses_classes_usfmd_does_not_write(db: Database, archive: Archive) -> None:
    us = make_sc()
    us.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    with pytest.raises(ConformanceError, match="not one usfmd writes results in"):
        store_result(db, archive, us, ["pacs"], T0)
