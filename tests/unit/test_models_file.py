"""The usfmd model file: round trip per task recipe, and refusal of anything that does not match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.errors import ModelLoadError
from pipelines.inpaint import InpaintParams
from pipelines.models import (
    FETALCLIP_LORA,
    FORMAT,
    FORMAT_VERSION,
    HeadSpec,
    TaskModel,
    build_task_model,
    get_encoder_card,
    load_model_file,
    logits_to_probabilities,
    read_model_info,
    save_model_file,
    sha256_file,
)
from pipelines.preprocess import PreprocessSpec, register_spec
from pipelines.tasks import get_task

USF = dict(get_encoder_card("usf-mae-vit-b16").tiny_overrides)
CLIP = dict(get_encoder_card("fetalclip-vit-l14").tiny_overrides)

RECIPES: dict[str, Callable[[], TaskModel]] = {
    "heart_view": lambda: build_task_model("heart_view", "usf-mae-vit-b16", overrides=USF),
    "ventriculomegaly": lambda: build_task_model(
        "ventriculomegaly", "usf-mae-vit-b16", overrides=USF
    ),
    "image_quality": lambda: build_task_model(
        "image_quality", "fetalclip-vit-l14", overrides=CLIP, lora=FETALCLIP_LORA
    ),
}


def _trained(task: str) -> TaskModel:
    torch.manual_seed(3)
    model = RECIPES[task]()
    with torch.no_grad():  # stand-in for training: every parameter moves off its init
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_round_trip_reproduces_the_model(task: str, tmp_path: Path) -> None:
    model = _trained(task)
    path = tmp_path / f"{task}.pt"
    digest = save_model_file(path, model, synthetic=True, metadata={"metrics": {"f1": 0.9}})
    assert digest == sha256_file(path)
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = load_model_file(path)
    info = loaded.info
    assert info.task is get_task(task)
    assert info.classes == get_task(task).class_names
    assert info.synthetic is True and info.metadata == {"metrics": {"f1": 0.9}}
    assert info.head == model.head_spec
    assert info.lora == model.lora
    assert info.preprocessing == model.preprocessing
    assert not loaded.model.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(expected, loaded.model(x))
        assert expected.shape == (2, get_task(task).num_outputs)
        if model.lora is not None:
            merged = load_model_file(path, merge_lora=True).model
            assert torch.allclose(expected, merged(x), atol=1e-5)


def test_recipes_follow_the_papers() -> None:
    heart = _trained("heart_view")
    assert heart.head_spec.kind == "mlp" and heart.card.preprocessing == "usf-mae"
    vm = _trained("ventriculomegaly")
    assert isinstance(vm.head, torch.nn.Linear) and vm.head.out_features == 2
    with torch.device("meta"):  # full size, without allocating 300M parameters
        iq = build_task_model("image_quality", "fetalclip-vit-l14", lora=FETALCLIP_LORA)
    assert isinstance(iq.head, torch.nn.Linear)
    assert (iq.head.in_features, iq.head.out_features) == (768, 1)
    assert iq.preprocessing.name == "fetalclip"
    assert iq.card.grid == (16, 16)


def test_probabilities_follow_the_task_head() -> None:
    iq = get_task("image_quality")
    probs = logits_to_probabilities(iq, torch.tensor([[0.0], [2.0]]))
    assert torch.allclose(probs[0], torch.tensor([0.5, 0.5]))
    assert probs[1, 1] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    vm = get_task("ventriculomegaly")
    assert torch.allclose(logits_to_probabilities(vm, torch.zeros(1, 2)), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="shape \\(batch, 2\\)"):
        logits_to_probabilities(vm, torch.zeros(1, 5))


def _tampered(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    path = tmp_path / "good.pt"
    save_model_file(path, _trained("ventriculomegaly"))
    payload = torch.load(path, weights_only=True)
    change(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    return bad


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("format", "something-else"), "not a usfmd model file"),
        (_set("format_version", 3), "format version 3; this usfmd reads 1, 2"),
        (_set("inpaint", {"radius": 3, "sharpen": True}), "settings \\['sharpen'\\] are unknown"),
        (_set("inpaint", {"radius": 0}), "inpaint settings are invalid"),
        (_set("inpaint", [3]), "field 'inpaint' is \\[3\\]"),
        (_set("classes", ["ventriculomegaly", "normal"]), "names and order must be equal"),
        (_set("task", "no_such_task"), "unknown task 'no_such_task'"),
        (_set("num_outputs", 1), "with 1 outputs"),
        (_set("encoder", {"name": "vit-huge", "overrides": {}}), "unknown encoder 'vit-huge'"),
        (_set("head", {"kind": "transformer"}), "head kind 'transformer'"),
        (_set("synthetic", "yes"), "field 'synthetic'"),
        (_set("extra", 1), "unknown fields \\['extra'\\]"),
        (
            lambda p: p["preprocessing"].__setitem__("interpolation", "bicubic"),
            "was .* in training but is registered as",
        ),
        (
            lambda p: p["state_dict"].pop("head.weight"),
            "1 missing key\\(s\\): head.weight",
        ),
        (
            lambda p: p["state_dict"].__setitem__("head.extra", torch.zeros(1)),
            "1 unexpected key\\(s\\): head.extra",
        ),
        (
            lambda p: p["state_dict"].__setitem__("head.weight", torch.zeros(3, 64)),
            "shape mismatch.*head.weight \\(checkpoint \\[3, 64\\], model \\[2, 64\\]\\)",
        ),
    ],
)
def test_mismatching_files_are_refused(
    change: Callable[[dict[str, Any]], None], message: str, tmp_path: Path
) -> None:
    bad = _tampered(tmp_path, change)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model_file(bad)
    assert str(bad) in str(info.value)


def test_inpaint_settings_travel_with_the_model(tmp_path: Path) -> None:
    """What the training images were inpainted with comes back exactly; files of format 1
    (before the field) still load and leave the cleaning to the daemon."""
    trained = InpaintParams(colour_flow_min_area=100, contrast=30)
    path = tmp_path / "m.pt"
    save_model_file(path, _trained("ventriculomegaly"), inpaint=trained)
    info = read_model_info(path)
    assert info.inpaint == trained and info.format_version == FORMAT_VERSION == 2
    assert info.parameters()["inpaint"]["colour_flow_min_area"] == 100

    # A setting added after the file was written keeps its default.
    payload = torch.load(path, weights_only=True)
    del payload["inpaint"]["dot_min_extent"]
    torch.save(payload, tmp_path / "older.pt")
    older = read_model_info(tmp_path / "older.pt").inpaint
    assert older == replace(trained, dot_min_extent=InpaintParams().dot_min_extent)
    # ...unless it changed behaviour: a file from before the JPEG tolerance keeps the exact
    # rules it was trained and validated with, whatever today's default.
    assert InpaintParams().lossy_tolerance == 6 and trained.lossy_tolerance == 6
    del payload["inpaint"]["lossy_tolerance"]
    torch.save(payload, tmp_path / "pre-jpeg.pt")
    pre_jpeg = read_model_info(tmp_path / "pre-jpeg.pt").inpaint
    assert pre_jpeg is not None and pre_jpeg.lossy_tolerance is None
    assert InpaintParams().caliper_arm == 4 and pre_jpeg.caliper_arm == trained.caliper_arm
    del payload["inpaint"]["caliper_arm"]  # ...nor the cross rule, added later still
    torch.save(payload, tmp_path / "pre-calipers.pt")
    pre_calipers = read_model_info(tmp_path / "pre-calipers.pt").inpaint
    assert pre_calipers is not None and pre_calipers.caliper_arm is None

    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    del payload["inpaint"]
    torch.save(payload, tmp_path / "v1.pt")
    v1 = load_model_file(tmp_path / "v1.pt").info
    assert v1.inpaint is None and v1.format_version == 1
    assert v1.parameters()["inpaint"] is None


def test_unregistered_preprocessing_is_refused(tmp_path: Path) -> None:
    spec = PreprocessSpec("test-only-pad", "pad", "nearest", (0.5,) * 3, (0.5,) * 3)
    register_spec(spec)
    model = build_task_model(
        "ventriculomegaly", "usf-mae-vit-b16", overrides=USF, preprocessing=spec.name
    )
    path = tmp_path / "m.pt"
    save_model_file(path, model)
    assert read_model_info(path).preprocessing == spec
    bad = _tampered(tmp_path, lambda p: p["preprocessing"].__setitem__("name", "nowhere"))
    with pytest.raises(ModelLoadError, match="unknown preprocessing spec 'nowhere'"):
        read_model_info(bad)


def test_files_that_are_not_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_file(tmp_path / "absent.pt")
    pickle_with_code = tmp_path / "code.pt"
    torch.save({"format": FORMAT, "model": torch.nn.Linear(2, 2)}, pickle_with_code)
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_model_file(pickle_with_code)
    state_only = tmp_path / "state.pt"
    torch.save(_trained("ventriculomegaly").state_dict(), state_only)
    with pytest.raises(ModelLoadError, match="not a usfmd model file"):
        load_model_file(state_only)


def test_merged_model_is_not_saved_and_metadata_must_be_json(tmp_path: Path) -> None:
    model = _trained("image_quality")
    with pytest.raises(ModelLoadError, match="metadata must be plain JSON"):
        save_model_file(tmp_path / "m.pt", model, metadata={"when": object()})
    model.merge_lora()
    with pytest.raises(ModelLoadError, match="before merge_lora"):
        save_model_file(tmp_path / "m.pt", model)
    assert not list(tmp_path.iterdir())


def test_head_spec_validation() -> None:
    with pytest.raises(ModelLoadError, match="dropout=1.5"):
        HeadSpec("mlp", dropout=1.5)
    with pytest.raises(ModelLoadError, match="unknown fields \\['depth'\\]"):
        HeadSpec.from_dict({"kind": "mlp", "depth": 3})


def test_device_and_bf16_settings() -> None:
    from pipelines.models import bf16_supported, resolve_bf16, resolve_device

    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_bf16("auto", cpu) is bf16_supported(cpu)
    assert resolve_bf16(False, cpu) is False
    with pytest.raises(ModelLoadError, match="device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="bf16 'sometimes'"):
        resolve_bf16("sometimes", cpu)
