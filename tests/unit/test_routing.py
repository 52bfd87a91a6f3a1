"""Routing rules: attribute patterns, requirements on other tasks' results, and validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from daemon.worker.routing import AnalysisSettings, Route, check_routes, decide
from pipelines.tasks import get_task


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


PLANE_TASK = {
    "name": "brain_plane",
    "title": "Fetal brain plane",
    "finding": {"value": "BP", "scheme": "99USFMD", "meaning": "Brain plane"},
    "classes": [
        {"name": "transventricular", "value": "BP-TV", "scheme": "99USFMD", "meaning": "TV"},
        {"name": "other", "value": "BP-O", "scheme": "99USFMD", "meaning": "Other"},
    ],
}

ROUTES = {
    "tasks": [PLANE_TASK],
    "routes": [
        {
            "task": "ventriculomegaly",
            "requires": {"task": "brain_plane", "classes": ["transventricular"]},
        },
        {"task": "brain_plane", "match": {"Modality": "US"}},
        {
            "task": "heart_view",
            "match": {"Manufacturer": ["GE*", "Samsung*"], "ImageType": "*PRIMARY*"},
        },
    ],
}


def test_without_routes_every_task_runs() -> None:
    decision = decide((), _header(Modality="US"), {"heart_view": "aorta"}, ["heart_view", "x"])
    assert decision.run == ("x",) and decision.deferred == ()


def test_requirement_defers_then_runs_or_skips() -> None:
    settings = AnalysisSettings.model_validate(ROUTES)
    header = _header(Modality="US", Manufacturer="Acme", ImageType=["ORIGINAL", "PRIMARY"])
    first = decide(settings.routes, header, {}, [])
    assert first.run == ("brain_plane",) and first.deferred == ("ventriculomegaly",)
    hit = decide(settings.routes, header, {"brain_plane": "transventricular"}, [])
    assert hit.run == ("ventriculomegaly",)
    miss = decide(settings.routes, header, {"brain_plane": "other"}, [])
    assert miss.run == () and miss.deferred == ()


def test_attribute_patterns_are_case_insensitive_and_multi_valued() -> None:
    routes = AnalysisSettings.model_validate(ROUTES).routes
    ge = _header(Modality="MR", Manufacturer="ge healthcare", ImageType=["ORIGINAL", "PRIMARY"])
    assert decide(routes, ge, {}, []).run == ("heart_view",)
    secondary = _header(Modality="MR", Manufacturer="GE", ImageType=["DERIVED", "SECONDARY"])
    assert decide(routes, secondary, {}, []).run == ()
    missing = _header(Modality="MR")
    assert decide(routes, missing, {}, []).run == ()


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([{"task": "a", "requires": {"task": "b", "classes": ["x"]}}], "which no route runs"),
        (
            [
                {"task": "a", "requires": {"task": "b", "classes": ["x"]}},
                {"task": "b", "requires": {"task": "a", "classes": ["y"]}},
            ],
            "circular",
        ),
        ([{"task": "a", "match": {"NotAKeyword": "x"}}], "not DICOM keywords"),
    ],
)
def test_bad_routes_are_refused(routes: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AnalysisSettings.model_validate({"routes": routes})


def test_check_routes_against_the_task_registry() -> None:
    tasks = {t: get_task(t) for t in ("heart_view", "ventriculomegaly")}
    check_routes([Route(task="heart_view")], tasks)
    with pytest.raises(ValueError, match="unknown task"):
        check_routes([Route(task="nope")], tasks)
    bad = Route.model_validate(
        {"task": "ventriculomegaly", "requires": {"task": "heart_view", "classes": ["brain"]}}
    )
    with pytest.raises(ValueError, match="does not have"):
        check_routes([bad], tasks)


def test_config_task_definitions_are_validated() -> None:
    third = {"name": "third", "value": "BP-3", "scheme": "99USFMD", "meaning": "Third"}
    broken = {**PLANE_TASK, "head": "sigmoid", "classes": [*PLANE_TASK["classes"], third]}
    with pytest.raises(ValidationError, match="needs exactly two classes"):
        AnalysisSettings.model_validate({"tasks": [broken]})
    spec = AnalysisSettings.model_validate(ROUTES).tasks[0].to_spec()
    assert spec.class_names == ("transventricular", "other")
