"""Model registry on both backends: import, list/show, activate (+ requeue), synthetic guard,
the workers' cache (hash check, hot reload) and the ``usfmd models`` command."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from daemon.cli import main
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.models import Job, JobState, ModelVersion
from daemon.db.queue import enqueue
from daemon.db.studies import ANALYZE
from daemon.models import (
    ModelCache,
    ModelRegistryError,
    activate,
    active_version,
    describe,
    get_version,
    import_model,
    list_versions,
    models_dir,
)
from daemon.models.cache import LoadedModel
from daemon.worker.analysis import clean_groups
from pipelines.clean import CleanParams
from pipelines.inpaint import InpaintParams
from pipelines.models import (
    FETALCLIP_LORA,
    build_task_model,
    get_encoder_card,
    save_model_file,
    sha256_file,
)
from pipelines.scrub import ScrubParams

from helpers import wait_for

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
USF = dict(get_encoder_card("usf-mae-vit-b16").tiny_overrides)
CLIP = dict(get_encoder_card("fetalclip-vit-l14").tiny_overrides)
X = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ventriculomegaly versions with different weights, a synthetic image-quality one."""
    out = tmp_path_factory.mktemp("model-files")
    made = {}
    for name, seed in (("vm1", 1), ("vm2", 2)):
        torch.manual_seed(seed)
        model = build_task_model("ventriculomegaly", "usf-mae-vit-b16", overrides=USF)
        made[name] = out / f"{name}.pt"
        save_model_file(made[name], model, metadata={"metrics": {"accuracy": 0.5 + seed / 10}})
    torch.manual_seed(3)
    iq = build_task_model("image_quality", "fetalclip-vit-l14", overrides=CLIP, lora=FETALCLIP_LORA)
    made["iq"] = out / "iq.pt"
    save_model_file(made["iq"], iq, synthetic=True)
    return made


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def _import(db: Database, data: Path, file: Path, version: str, **kw: object) -> int:
    with db.write() as session:
        row = import_model(
            session,
            file,
            version=version,
            synthetic=bool(kw.pop("synthetic", False)),
            data_dir=data,
            now=T0,
            **kw,  # type: ignore[arg-type]
        )
        return row.id


def test_import_records_a_verified_copy(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    ident = _import(db, tmp_path, files["vm1"], "2026.11-1")
    with db.read() as session:
        row = get_version(session, ident)
        shown = describe(row)
    stored = models_dir(tmp_path) / row.path
    assert stored.is_file() and stored.parent == models_dir(tmp_path)
    assert row.sha256 == sha256_file(stored) == sha256_file(files["vm1"])
    assert re.fullmatch(r"2\.25\.[1-9]\d*", row.device_uid) and len(row.device_uid) <= 64
    assert (row.task, row.encoder, row.preprocessing) == (
        "ventriculomegaly",
        "usf-mae-vit-b16",
        "usf-mae",
    )
    assert row.classes == ["normal", "ventriculomegaly"]
    assert row.metrics == {"accuracy": 0.6}  # taken from the file's metadata
    assert row.parameters["encoder_overrides"] == USF
    assert row.parameters["head"]["kind"] == "linear"
    assert not row.active and not row.synthetic
    assert row.algorithm_name == "usfmd ventriculomegaly usf-mae-vit-b16"
    assert json.loads(json.dumps(shown))["id"] == ident
    assert not list(models_dir(tmp_path).glob(".import-*"))


def test_versions_get_new_device_uids_and_unique_labels(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    first = _import(db, tmp_path, files["vm1"], "1")
    second = _import(db, tmp_path, files["vm1"], "2", metrics={"f1": 0.8})
    with pytest.raises(ModelRegistryError, match="already has a version '1'"):
        _import(db, tmp_path, files["vm2"], "1")
    with pytest.raises(ModelRegistryError, match="version '../x'"):
        _import(db, tmp_path, files["vm2"], "../x")
    with db.read() as session:
        rows = list_versions(session)
        assert [r.id for r in rows] == [first, second]
        assert rows[0].device_uid != rows[1].device_uid
        assert rows[1].metrics == {"f1": 0.8}
        assert get_version(session, "ventriculomegaly:2").id == second
        with pytest.raises(ModelRegistryError, match="no model version '99'"):
            get_version(session, 99)
    assert len(list(models_dir(tmp_path).iterdir())) == 2


def test_unusable_file_leaves_nothing_behind(db: Database, tmp_path: Path) -> None:
    bad = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ModelRegistryError, match="not a usable usfmd model file"):
        _import(db, tmp_path / "data", bad, "1")
    with pytest.raises(ModelRegistryError, match="does not exist"):
        _import(db, tmp_path / "data", tmp_path / "absent.pt", "1")
    assert not list(models_dir(tmp_path / "data").iterdir())
    with db.read() as session:
        assert list_versions(session) == []


def test_synthetic_versions_are_named_and_guarded(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        ModelRegistryError, match="trained on synthetic data: import it as synthetic"
    ):
        _import(db, tmp_path, files["iq"], "demo")
    with pytest.raises(ModelRegistryError, match="must contain 'synthetic'"):
        _import(db, tmp_path, files["iq"], "demo", synthetic=True, algorithm_name="IQ net")
    ident = _import(db, tmp_path, files["iq"], "demo", synthetic=True)
    with db.write() as session:
        row = get_version(session, ident)
        assert row.synthetic and "synthetic" in row.algorithm_name
        with pytest.raises(ModelRegistryError, match="needs an explicit --allow-synthetic"):
            activate(session, ident)
    with db.read() as session:
        assert active_version(session, "image_quality") is None
    with db.write() as session:
        activate(session, ident, allow_synthetic=True, now=T0)
    with db.read() as session:
        row = get_version(session, ident)
        assert row.active
        assert row.parameters["activation"]["synthetic_forced"] is True


def test_algorithm_name_defaults_to_the_files_own(db: Database, tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = build_task_model("ventriculomegaly", "usf-mae-vit-b16", overrides=USF)
    named = tmp_path / "named.pt"
    save_model_file(named, model, synthetic=True, metadata={"algorithm_name": "VM synthetic 7"})
    ident = _import(db, tmp_path, named, "a", synthetic=True)
    with db.read() as session:
        assert get_version(session, ident).algorithm_name == "VM synthetic 7"
    overridden = _import(db, tmp_path, named, "b", synthetic=True, algorithm_name="synthetic B")
    with db.read() as session:
        assert get_version(session, overridden).algorithm_name == "synthetic B"
    unsafe = tmp_path / "unsafe.pt"
    save_model_file(unsafe, model, synthetic=True, metadata={"algorithm_name": "VM net"})
    with pytest.raises(ModelRegistryError, match="'VM net' must contain 'synthetic'"):
        _import(db, tmp_path, unsafe, "c", synthetic=True)


def _job(db: Database, kind: str, state: JobState) -> int:
    with db.write() as session:
        job = enqueue(session, kind, T0)
        job.state = state
        session.flush()
        return job.id


def test_activate_one_per_task_and_requeue_waiting_analyses(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    v1 = _import(db, tmp_path, files["vm1"], "1")
    v2 = _import(db, tmp_path, files["vm2"], "2")
    iq = _import(db, tmp_path, files["iq"], "demo", synthetic=True)
    waiting = [_job(db, ANALYZE, JobState.AWAITING_MODEL) for _ in range(2)]
    done = _job(db, ANALYZE, JobState.DONE)
    probe = _job(db, "probe", JobState.AWAITING_MODEL)
    with db.write() as session:
        activate(session, iq, allow_synthetic=True, now=T0)
        first = activate(session, v1, now=T0)
    assert (first.previous, first.requeued) == ((), 0)  # the synthetic one requeued them
    with db.write() as session:
        second = activate(session, "ventriculomegaly:2", now=T0)
    assert (second.version_id, second.previous) == (v2, (v1,))
    with db.read() as session:
        active = {r.id for r in list_versions(session) if r.active}
        states = {j.id: j.state for j in session.scalars(select(Job))}
        stamp = get_version(session, v2).activated_at
    assert active == {v2, iq}
    assert [states[j] for j in waiting] == [JobState.QUEUED, JobState.QUEUED]
    assert states[done] == JobState.DONE and states[probe] == JobState.AWAITING_MODEL
    assert stamp == T0


def test_concurrent_activations_leave_exactly_one_active(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    ids = [_import(db, tmp_path, files["vm1"], str(i)) for i in range(4)]
    errors: list[BaseException] = []

    def run(ident: int) -> None:
        try:
            with db.write() as session:
                activate(session, ident)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    with db.read() as session:
        assert sum(r.active for r in list_versions(session)) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_loads_active_version_and_hot_reloads(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    v1 = _import(db, tmp_path, files["vm1"], "1")
    v2 = _import(db, tmp_path, files["vm2"], "2")
    clock = FakeClock()
    cache = ModelCache(db, models_dir(tmp_path), reload_seconds=30, device="cpu", clock=clock)
    assert cache.get("ventriculomegaly") is None  # no active version: the job waits
    with db.write() as session:
        activate(session, v1)
    assert cache.get("ventriculomegaly") is None  # not re-checked before reload_seconds
    clock.now += 30
    first = cache.get("ventriculomegaly")
    assert first is not None and first.ref.id == v1
    assert not first.model.training and first.preprocessing.name == "usf-mae"
    assert first.card.target_layer == "blocks[-1].norm1" and first.card.grid == (14, 14)
    with db.write() as session:
        activate(session, v2)
    clock.now += 29
    assert cache.get("ventriculomegaly") is first
    clock.now += 1
    second = cache.get("ventriculomegaly")
    assert second is not None and second.ref.id == v2
    assert second.ref.device_uid != first.ref.device_uid
    with torch.no_grad():
        assert not torch.equal(first.model(X), second.model(X))


def test_each_model_gets_frames_cleaned_as_in_its_training(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    """The inpaint settings a file records reach the worker; models that agree share a pass,
    a model recording none follows the daemon's settings, and the scrub stays the daemon's."""
    torch.manual_seed(4)
    heart = build_task_model("heart_view", "usf-mae-vit-b16", overrides=USF)
    kept_flow = InpaintParams(colour_flow_min_area=100)
    save_model_file(tmp_path / "heart.pt", heart, synthetic=True, inpaint=kept_flow)
    vm_id = _import(db, tmp_path, files["vm1"], "1")
    heart_id = _import(db, tmp_path, tmp_path / "heart.pt", "h1", synthetic=True)
    with db.write() as session:
        activate(session, vm_id)
        activate(session, heart_id, allow_synthetic=True)
    with db.read() as session:
        shown = describe(get_version(session, heart_id))
    assert shown["parameters"]["inpaint"]["colour_flow_min_area"] == 100
    cache = ModelCache(db, models_dir(tmp_path), device="cpu")
    models: dict[str, LoadedModel] = {}
    for task in ("heart_view", "ventriculomegaly"):
        loaded = cache.get(task)
        assert loaded is not None
        models[task] = loaded
    assert models["heart_view"].inpaint == kept_flow
    assert models["ventriculomegaly"].inpaint is None

    strips = ScrubParams(strips={("ACME", "*"): 40})
    daemon = CleanParams(scrub=strips, inpaint=InpaintParams(contrast=50), detect_band=False)
    passes = clean_groups(models, daemon)
    assert [(p.inpaint, tasks) for p, tasks in passes] == [
        (kept_flow, ["heart_view"]),
        (daemon.inpaint, ["ventriculomegaly"]),
    ]
    assert all(p.scrub is strips and p.detect_band is False for p, _ in passes)
    same = CleanParams(scrub=strips, inpaint=kept_flow)
    assert [tasks for _, tasks in clean_groups(models, same)] == [
        ["heart_view", "ventriculomegaly"]
    ]


def test_cache_notices_activation_in_real_time(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    v1 = _import(db, tmp_path, files["vm1"], "1")
    v2 = _import(db, tmp_path, files["vm2"], "2")
    with db.write() as session:
        activate(session, v1)
    cache = ModelCache(db, models_dir(tmp_path), reload_seconds=0.2, device="cpu")
    assert cache.get("ventriculomegaly").ref.id == v1  # type: ignore[union-attr]
    with db.write() as session:
        activate(session, v2)

    def current() -> bool:
        loaded = cache.get("ventriculomegaly")
        return loaded is not None and loaded.ref.id == v2

    wait_for(current, timeout=10, msg="cache picks up the newly activated version")


def test_cache_refuses_a_file_whose_hash_changed(
    db: Database, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = _import(db, tmp_path, files["vm1"], "1")
    with db.write() as session:
        activate(session, v1)
        stored = models_dir(tmp_path) / get_version(session, v1).path
    stored.chmod(0o644)
    stored.write_bytes(files["vm2"].read_bytes())  # a valid model, but not the imported one
    clock = FakeClock()
    cache = ModelCache(db, models_dir(tmp_path), reload_seconds=5, device="cpu", clock=clock)
    import daemon.models.cache as cache_module

    loads: list[Path] = []
    real_load = cache_module.load_model_file
    monkeypatch.setattr(
        cache_module, "load_model_file", lambda p, **kw: loads.append(p) or real_load(p, **kw)
    )
    with pytest.raises(ModelRegistryError, match="refusing to load a changed or corrupt model"):
        cache.get("ventriculomegaly")
    with pytest.raises(ModelRegistryError, match="sha256"):
        cache.get("ventriculomegaly")  # remembered until the next check
    assert loads == []
    stored.write_bytes(files["vm1"].read_bytes())  # the operator restores the file
    clock.now += 5
    assert cache.get("ventriculomegaly").ref.id == v1  # type: ignore[union-attr]
    assert loads == [stored.resolve()]


def test_cache_refuses_missing_file_and_unknown_device(
    db: Database, files: dict[str, Path], tmp_path: Path
) -> None:
    v1 = _import(db, tmp_path, files["vm1"], "1")
    with db.write() as session:
        activate(session, v1)
        (models_dir(tmp_path) / get_version(session, v1).path).unlink()
    cache = ModelCache(db, models_dir(tmp_path), device="cpu")
    with pytest.raises(ModelRegistryError, match="is missing"):
        cache.get("ventriculomegaly")
    if not torch.cuda.is_available():
        from pipelines.errors import ModelLoadError

        with pytest.raises(ModelLoadError, match="no CUDA device"):
            ModelCache(db, models_dir(tmp_path), device="cuda")


def test_cli_models_commands(
    db_url: str,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("USFMD_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("USFMD_DATABASE__URL", db_url)
    assert main(["db", "upgrade"]) == 0
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"f1": 0.9178}))
    assert (
        main(["models", "import", str(files["vm1"]), "--version", "1", "--metrics", str(metrics)])
        == 0
    )
    assert "imported ventriculomegaly:1 as id 1" in capsys.readouterr().out
    assert main(["models", "import", str(files["iq"]), "--version", "d", "--activate"]) == 2
    assert "--synthetic" in capsys.readouterr().err
    assert (
        main(["models", "import", str(files["iq"]), "--version", "d", "--synthetic", "--activate"])
        == 2
    )
    assert "--allow-synthetic" in capsys.readouterr().err
    assert len(list(models_dir(tmp_path / "data").iterdir())) == 1  # rolled back, file too
    assert main(["models", "list", "--json"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["1"]
    assert main(["models", "activate", "ventriculomegaly:1"]) == 0
    assert "activated id 1 for ventriculomegaly" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\s+1 ventriculomegaly\s+1\s+\*", table, re.MULTILINE)
    assert main(["models", "show", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["active"] and shown["metrics"] == {"f1": 0.9178}
    assert shown["sha256"] == sha256_file(files["vm1"])
    assert main(["models", "show", "1"]) == 0
    assert "device_uid      2.25." in capsys.readouterr().out
    assert main(["models", "deactivate", "ventriculomegaly:1"]) == 0
    assert "ventriculomegaly has no active model" in capsys.readouterr().out
    assert main(["models", "show", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert not shown["active"] and "deactivation" in shown["parameters"]
    assert main(["models", "deactivate", "1"]) == 0  # already inactive: nothing changes
    capsys.readouterr()
    assert main(["models", "show", "7"]) == 2
    assert "no model version '7'" in capsys.readouterr().err
    assert main(["models", "import", str(files["vm2"])]) == 2
    assert "--version" in capsys.readouterr().err
    database = Database(db_url)
    try:
        with database.read() as session:
            assert session.scalar(select(ModelVersion.version)) == "1"
    finally:
        database.dispose()
