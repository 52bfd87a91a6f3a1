"""The synthetic demo model: trained once on phantoms (a few minutes of CPU), it must reach ≥ 95 %
accuracy on held-out phantoms, load as a usfmd model file marked synthetic, and import into the
model registry (SQLite) under an algorithm name that says "synthetic".

Reusing the trained file: set ``USFMD_DEMO_MODEL_CACHE=/some/path/demo.pt`` and this module copies
the file it trained there (atomically), so an end-to-end test can load it instead of training
again. The variable is read when the module is imported, before the suite's fixtures clear
``USFMD_*`` variables. A file found there is never used by this module: it always trains.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.models import ModelRegistryError, activate, active_version, import_model
from pipelines.models import load_model_file
from pipelines.preprocess import USF_MAE
from training.demo import DemoConfig, DemoResult, demo_algorithm_name, demo_clean_params
from training.finetune import evaluate, torch_threads
from training.phantom_data import build_split

pytestmark = pytest.mark.timeout(900)

CACHE = os.environ.get("USFMD_DEMO_MODEL_CACHE")
CONFIG = DemoConfig()


def _publish(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@pytest.fixture(scope="module")
def demo(demo_model: DemoResult) -> DemoResult:
    print(f"demo: {demo_model.seconds:.0f} s, test accuracy {demo_model.test['accuracy']:.4f}")
    if CACHE:
        _publish(demo_model.path, Path(CACHE))
    return demo_model


def test_demo_reaches_95_percent_on_held_out_phantoms(demo: DemoResult) -> None:
    test = demo.test
    assert test["n"] == CONFIG.test
    assert test["accuracy"] >= 0.95, json.dumps(test["confusion_matrix"])
    assert min(c["recall"] for c in test["per_class"].values()) >= 0.8
    assert demo.val["accuracy"] >= 0.9
    timing = demo.metadata["timing"]
    assert timing["total_seconds"] == pytest.approx(demo.seconds, abs=0.01)


def test_file_loads_marked_synthetic_and_predicts_as_measured(demo: DemoResult) -> None:
    loaded = load_model_file(demo.path)
    info = loaded.info
    assert info.synthetic is True
    assert info.task.name == CONFIG.task
    assert info.encoder == "usf-mae-vit-b16" and info.overrides["patch_size"] == CONFIG.patch_size
    assert info.preprocessing == USF_MAE
    meta = info.metadata
    assert meta["algorithm_name"] == demo_algorithm_name(CONFIG.task)
    assert "synthetic" in meta["algorithm_name"] and "never" in meta["purpose"]
    assert meta["metrics"]["accuracy"] == demo.test["accuracy"]
    assert meta["data"]["clean"]["inpaint"]["colour_flow_min_area"] is not None
    # What the daemon cleans this model's frames with: the demo's inpaint, colour flow kept.
    assert info.inpaint == demo_clean_params().inpaint
    assert info.inpaint is not None and info.inpaint.colour_flow_min_area == 100
    # The loaded file reproduces the test accuracy on the same held-out phantoms.
    spec = CONFIG.data_spec()
    test_split = build_split(spec, "test", info.preprocessing)
    with torch_threads(CONFIG.threads):  # the thread count the demo evaluated with
        again = evaluate(loaded.model, test_split, batch_size=CONFIG.batch_size)
    assert again.metrics["confusion_matrix"] == demo.test["confusion_matrix"]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'index.db'}")
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def test_imports_into_the_registry_as_synthetic(
    demo: DemoResult, sqlite_db: Database, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with sqlite_db.write() as session:
        row = import_model(
            session,
            demo.path,
            version="demo-1",
            synthetic=True,
            data_dir=data,
            algorithm_name=demo.algorithm_name,
        )
        version_id = row.id
        assert row.algorithm_name == "usfmd synthetic phantom demo heart_view"
        assert row.metrics is not None and row.metrics["accuracy"] >= 0.95
    with sqlite_db.write() as session, pytest.raises(ModelRegistryError, match="synthetic"):
        activate(session, version_id)
    with sqlite_db.write() as session:
        activate(session, version_id, allow_synthetic=True)
    with sqlite_db.read() as session:
        active = active_version(session, "heart_view")
        assert active is not None and active.id == version_id and active.synthetic
        assert "synthetic" in active.algorithm_name.lower()
    with sqlite_db.write() as session, pytest.raises(ModelRegistryError, match="synthetic"):
        import_model(session, demo.path, version="demo-2", synthetic=False, data_dir=data)


def test_cli_trains_a_small_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``usfmd models train-demo`` end to end, at a size that only proves the plumbing."""
    out = tmp_path / "small.pt"
    args = ["--task", "ventriculomegaly", "--train", "4", "--val", "2", "--test", "2"]
    code = main(["models", "train-demo", *args, "--epochs", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out test phantoms" in printed and "confusion matrix" in printed
    assert "synthetic phantom demo ventriculomegaly" in printed
    info = load_model_file(out).info
    assert info.synthetic and info.task.name == "ventriculomegaly"
    assert info.metadata["data"]["vm_margin_mm"] == CONFIG.vm_margin_mm
    assert main(["models", "train-demo", "--task", "image_quality", "--out", str(out)]) == 2
    assert "phantoms label" in capsys.readouterr().err
