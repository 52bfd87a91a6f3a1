"""Fixtures: isolated settings, both database backends, an in-process daemon on a free port."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemon.config import Settings, load_settings
from daemon.service import Daemon

from helpers import free_port

#: PostgreSQL server used to create one throw-away database per test (CI: 127.0.0.1:5432).
PG_ADMIN = os.environ.get("USFMD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No developer USFMD_* variable may leak into a test."""
    for key in list(os.environ):
        if key.startswith("USFMD_") and key != "USFMD_TEST_PG":
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the CLI in process installs usfmd's stderr handler on the root logger,
    bound to that test's capture stream; left there, every later log record hit the closed
    stream ("--- Logging error ---", shown when a background thread logged between tests)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _pg_database() -> Iterator[str]:
    name = f"usfmd_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - CI always has PostgreSQL
        if os.environ.get("USFMD_TEST_PG_OPTIONAL") == "1":
            pytest.skip(f"PostgreSQL unavailable: {exc}")
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each DB test runs on both supported backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
    else:
        yield from _pg_database()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _pg_database()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings rooted in tmp_path on a free port; keyword arguments override whole sections."""

    def make(**sections: Any) -> Settings:
        base: dict[str, dict[str, Any]] = {
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_space": 0},
            "dicom": {"port": free_port()},
            "study": {"stable_seconds": 1.0, "sweep_interval_seconds": 0.2},
            # Receive tests run without worker processes; worker tests ask for them.
            "queue": {"workers": 0},
        }
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        return load_settings(None, **base)

    return make


@pytest.fixture
def start_daemon(make_settings: SettingsFactory) -> Iterator[Callable[..., Daemon]]:
    """Start an in-process daemon (same code as ``usfmd serve``); stopped at teardown."""
    started: list[Daemon] = []

    def start(settings: Settings | None = None, **sections: Any) -> Daemon:
        daemon = Daemon(settings or make_settings(**sections))
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The synthetic demo model (training/demo.py), trained once per test session (~2 min)."""
    from training.demo import DemoConfig, train_demo

    out = tmp_path_factory.mktemp("demo") / "heart_view-demo.pt"
    return train_demo(DemoConfig(), out)
