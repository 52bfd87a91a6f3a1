"""Task registry: built-in tasks are well formed and bad definitions are refused with a reason."""

from __future__ import annotations

import pytest

from pipelines.tasks import (
    BUILTIN_TASKS,
    USFMD_SCHEME,
    Code,
    TaskClass,
    TaskSpec,
    get_task,
    list_tasks,
    register_task,
)


@pytest.mark.parametrize("task", BUILTIN_TASKS, ids=lambda t: t.name)
def test_builtin_tasks_have_distinct_codes_and_outputs(task: TaskSpec) -> None:
    codes = [(c.code.value, c.code.scheme) for c in task.classes]
    assert len(set(codes)) == len(codes)
    assert task.finding not in [c.code for c in task.classes]
    assert task.num_outputs == (1 if task.head == "sigmoid" else len(task.classes))
    assert get_task(task.name) is task


def test_paper_class_lists() -> None:
    assert get_task("heart_view").class_names == (
        "aorta",
        "atrioventricular_flows",
        "v_sign",
        "x_sign",
        "other",
    )
    assert get_task("ventriculomegaly").class_names == ("normal", "ventriculomegaly")
    iq = get_task("image_quality")
    assert iq.head == "sigmoid" and iq.class_names == ("inadequate", "adequate")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad-Name"}, "lower-case"),
        ({"classes": (TaskClass("a", Code("A", USFMD_SCHEME, "A")),)}, "at least two"),
        (
            {
                "head": "sigmoid",
                "classes": tuple(TaskClass(n, Code(n, USFMD_SCHEME, n)) for n in "abc"),
            },
            "exactly two",
        ),
        ({"normal_class": "zzz"}, "not in"),
    ],
)
def test_bad_task_definitions_are_refused(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "name": "extra_task",
        "title": "Extra",
        "finding": Code("X", USFMD_SCHEME, "X"),
        "classes": (
            TaskClass("a", Code("A", USFMD_SCHEME, "A")),
            TaskClass("b", Code("B", USFMD_SCHEME, "B")),
        ),
    }
    with pytest.raises(ValueError, match=message):
        TaskSpec(**{**base, **kwargs})  # type: ignore[arg-type]


def test_code_lengths_follow_ps3_5() -> None:
    with pytest.raises(ValueError, match="1 to 16"):
        Code("X" * 17, USFMD_SCHEME, "too long")
    with pytest.raises(ValueError, match="1 to 64"):
        Code("X", USFMD_SCHEME, "m" * 65)


def test_register_task_refuses_silent_redefinition() -> None:
    heart = get_task("heart_view")
    register_task(heart)  # the same definition again is fine
    changed = TaskSpec(heart.name, "Changed", heart.finding, heart.classes)
    with pytest.raises(ValueError, match="already registered"):
        register_task(changed)
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")
    assert [t.name for t in list_tasks()][:3] == sorted(t.name for t in list_tasks())[:3]
