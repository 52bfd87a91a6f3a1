"""Inference: probabilities per head, predictor, bf16 switch, shared batches, cine aggregation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipelines.infer import (
    Batcher,
    InferenceError,
    Predictor,
    aggregate,
    cpuinfo_has_bf16,
    device_has_bf16,
    probabilities,
    resolve_bf16,
    select_device,
)
from pipelines.models import build_task_model, get_encoder_card
from pipelines.tasks import get_task

from helpers import wait_for

HEART = get_task("heart_view")  # softmax, 5 classes
QUALITY = get_task("image_quality")  # sigmoid, 2 classes


def _tiny_vit(num_classes: int, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=num_classes
    )
    assert isinstance(model.head, torch.nn.Linear)
    with torch.no_grad():
        # A random-init head is nearly constant; spread its logits so classes actually compete.
        model.head.weight.normal_(0.0, 2.0)
    return model.eval()


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, (n, 3, 14, 14)).astype(np.float32)
    # Patch-scale structure plus pixel noise: inputs the model tells apart.
    big = np.kron(base, np.ones((1, 1, 16, 16), dtype=np.float32))
    return big + rng.normal(0.0, 0.3, big.shape).astype(np.float32)


# --- probabilities -------------------------------------------------------------------------------
def test_softmax_probabilities_match_reference_and_sum_to_one() -> None:
    logits = np.random.default_rng(0).normal(0, 4, (7, 5)).astype(np.float32)
    logits[0] = [1000.0, -1000.0, 0.0, 3.0, 999.0]  # overflow-prone row
    probs = probabilities(logits, "softmax")
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    assert probs.dtype == np.float32 and probs.shape == (7, 5)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 1), (6,)])
def test_sigmoid_single_logit_gives_one_minus_p_and_p(shape: tuple[int, ...]) -> None:
    raw = np.array([-30.0, -2.0, 0.0, 0.5, 3.0, 30.0], dtype=np.float32)
    probs = probabilities(raw.reshape(shape), "sigmoid")
    p = 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
    np.testing.assert_allclose(probs[:, 1], p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(probs[:, 0], 1.0 - p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_probabilities_refuse_wrong_shapes_and_non_finite_logits() -> None:
    with pytest.raises(InferenceError, match="sigmoid head"):
        probabilities(np.zeros((3, 2), np.float32), "sigmoid")
    with pytest.raises(InferenceError, match="softmax head"):
        probabilities(np.zeros((3, 1), np.float32), "softmax")
    with pytest.raises(InferenceError, match="non-finite"):
        probabilities(np.array([[0.0, np.nan]], np.float32), "softmax")
    with pytest.raises(ValueError, match="head="):
        probabilities(np.zeros((3, 2), np.float32), "relu")  # type: ignore[arg-type]


# --- device and bf16 switch ----------------------------------------------------------------------
def test_cpuinfo_flag_detection() -> None:
    plain = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert not cpuinfo_has_bf16(plain)
    assert cpuinfo_has_bf16(plain.replace("avx512_vnni", "avx512_vnni avx512_bf16"))
    assert cpuinfo_has_bf16("flags : sse amx_bf16 amx_tile\n")
    assert not cpuinfo_has_bf16("model name : avx512_bf16 in a name is not a flag\n")


def test_bf16_switch() -> None:
    cpu = torch.device("cpu")
    assert resolve_bf16("off", cpu) is False
    assert resolve_bf16("on", cpu) is True
    assert resolve_bf16("auto", cpu) is device_has_bf16(cpu)
    with pytest.raises(ValueError, match="bf16="):
        resolve_bf16("maybe", cpu)  # type: ignore[arg-type]


def test_device_selection_fails_closed_without_cuda() -> None:
    assert select_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device(None).type == "cuda"
    else:
        assert select_device(None).type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


# --- predictor -----------------------------------------------------------------------------------
def test_predictor_probabilities_match_direct_softmax_of_the_model() -> None:
    model = _tiny_vit(HEART.num_outputs)
    x = _inputs(6)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    predictor = Predictor(model, HEART, device="cpu", bf16="off")
    probs = predictor.predict(x)
    assert probs.shape == (6, len(HEART.classes))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(set(probs.argmax(axis=1).tolist())) > 1, "head outputs are degenerate"


def test_predictor_sigmoid_task() -> None:
    model = _tiny_vit(1)
    x = _inputs(4)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(x))[:, 0].double()).numpy()
    probs = Predictor(model, QUALITY, device="cpu", bf16="off").predict(x)
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs[:, 1], p, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_predictor_fails_closed_on_wrong_inputs_and_outputs() -> None:
    predictor = Predictor(_tiny_vit(3), HEART, device="cpu", bf16="off")  # 3 logits, task has 5
    with pytest.raises(InferenceError, match=r"expected \(2, 5\)"):
        predictor.predict(_inputs(2))
    with pytest.raises(ValueError, match="inputs of shape"):
        predictor.predict(np.zeros((2, 3, 112, 112), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        predictor.predict(np.zeros((2, 3, 224, 224), np.float64))
    with pytest.raises(ValueError, match="no frame"):
        predictor.predict(np.zeros((0, 3, 224, 224), np.float32))


def _centre_head(model: VisionTransformer, x: np.ndarray) -> VisionTransformer:
    """Centre and scale the head on these inputs' features, so that every class gets frames."""
    head = model.head
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True)
        logits = head(features)
        scale = 1.0 / logits.std(dim=0)
        head.weight.mul_(scale[:, None])
        head.bias.copy_((head.bias - logits.mean(dim=0)) * scale)
    return model


def test_bf16_autocast_agrees_with_fp32_on_a_tiny_model() -> None:
    x = _inputs(48, seed=5)
    model = _centre_head(_tiny_vit(HEART.num_outputs), x)
    twin = _tiny_vit(HEART.num_outputs)
    twin.load_state_dict(model.state_dict())
    fp32 = Predictor(model, HEART, device="cpu", bf16="off")
    bf16 = Predictor(twin, HEART, device="cpu", bf16="on")
    assert bf16.bf16 and not fp32.bf16
    p32, p16 = fp32.predict(x), bf16.predict(x)
    assert len(set(p32.argmax(axis=1).tolist())) >= 3, "head outputs are degenerate"
    np.testing.assert_allclose(p16.sum(axis=1), 1.0, atol=1e-5)
    # bf16 keeps ~3 significant digits; a random-init ViT's features differ between inputs by
    # only ~8 % of their norm, so the centred head magnifies that rounding: bounds are loose.
    assert np.abs(p16 - p32).max() < 0.1
    assert (p16.argmax(axis=1) == p32.argmax(axis=1)).mean() >= 0.9
    # Every frame the fp32 model decides clearly keeps its class in bf16.
    top2 = np.sort(p32, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05
    assert clear.sum() >= 30
    np.testing.assert_array_equal(p16[clear].argmax(axis=1), p32[clear].argmax(axis=1))


@pytest.mark.parametrize("encoder", ["usf-mae-vit-b16", "fetalclip-vit-l14", "resnet50"])
def test_bf16_predictor_keeps_linear_weights_in_bf16_with_autocasts_exact_logits(
    encoder: str,
) -> None:
    """Storing the Linear weights in bf16 saves autocast's per-pass casts and changes no bit:
    timm's ViT, open_clip's ViT (its attention's own projections) and a CNN with a Linear head."""
    overrides = dict(get_encoder_card(encoder).tiny_overrides)
    model = build_task_model("heart_view", encoder, overrides=overrides).eval()
    reference = build_task_model("heart_view", encoder, overrides=overrides).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.from_numpy(_inputs(6, seed=9))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x).float()
    predictor = Predictor(model, HEART, device="cpu", bf16="on")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    others = [
        p
        for m in model.modules()
        if not isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    ]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert torch.equal(torch.from_numpy(predictor.logits(x)), expected)
    # Without bf16 the model is left as it came.
    Predictor(reference, HEART, device="cpu", bf16="off")
    assert all(p.dtype == torch.float32 for p in reference.parameters())


# --- batcher -------------------------------------------------------------------------------------
def _rows(job: int, n: int) -> np.ndarray:
    return np.stack([np.full(n, job, np.float32), np.arange(n, dtype=np.float32)], axis=1)


class _Recorder:
    """A batch function that remembers each batch's size and can be held at a gate."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.called: list[float] = []
        self.gate = gate
        self.fail = fail
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.called.append(time.monotonic())
        self.sizes.append(len(batch))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail or (batch[:, 0] < 0).any():
            raise RuntimeError("forward pass failed")
        return batch * 10.0


def test_concurrent_submitters_get_their_own_rows() -> None:
    recorder = _Recorder()
    results: dict[int, np.ndarray] = {}
    sizes = {job: 1 + (job * 7) % 23 for job in range(12)}
    with Batcher(recorder, item_shape=(2,), max_batch=16, max_wait_ms=5) as batcher:

        def job(index: int) -> None:
            results[index] = batcher(_rows(index, sizes[index]), timeout=10)

        threads = [threading.Thread(target=job, args=(i,)) for i in sizes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert sorted(results) == sorted(sizes)
    for index, out in results.items():
        np.testing.assert_array_equal(out, _rows(index, sizes[index]) * 10.0)
    assert sum(recorder.sizes) == sum(sizes.values())
    assert max(recorder.sizes) <= 16


def test_frames_from_different_jobs_share_a_batch() -> None:
    gate = threading.Event()
    recorder = _Recorder(gate)
    with Batcher(recorder, item_shape=(2,), max_batch=32, max_wait_ms=50) as batcher:
        first = batcher.submit(_rows(99, 1))
        wait_for(recorder.entered.is_set, 5, "first batch to start")
        futures = [batcher.submit(_rows(job, 2)) for job in range(4)]
        wait_for(lambda: batcher.pending_frames == 8, 5, "eight frames queued")
        gate.set()
        outs = [f.result(5) for f in futures]
        first.result(5)
    assert recorder.sizes == [1, 8]
    for job, out in enumerate(outs):
        np.testing.assert_array_equal(out, _rows(job, 2) * 10.0)


def test_batches_respect_max_size_and_split_large_submissions_in_order() -> None:
    recorder = _Recorder()
    with Batcher(recorder, item_shape=(2,), max_batch=16, max_wait_ms=200) as batcher:
        out = batcher(_rows(3, 50), timeout=10)
    np.testing.assert_array_equal(out, _rows(3, 50) * 10.0)
    assert recorder.sizes == [16, 16, 16, 2]
    assert batcher.stats.largest == 16 and batcher.stats.frames == 50


def test_a_partial_batch_waits_max_wait_and_a_full_one_does_not() -> None:
    recorder = _Recorder()
    with Batcher(recorder, item_shape=(2,), max_batch=8, max_wait_ms=150) as batcher:
        submitted = time.monotonic()
        batcher(_rows(1, 3), timeout=10)
        assert recorder.called[0] - submitted >= 0.145
        assert recorder.sizes == [3]
    slow = _Recorder()
    with Batcher(slow, item_shape=(2,), max_batch=4, max_wait_ms=60_000) as batcher:
        batcher(_rows(2, 4), timeout=10)  # a full batch leaves at once, not after a minute
        assert slow.sizes == [4]


def test_a_failing_forward_pass_reaches_every_waiting_caller() -> None:
    gate = threading.Event()
    recorder = _Recorder(gate)
    with Batcher(recorder, item_shape=(2,), max_batch=32, max_wait_ms=50) as batcher:
        blocker = batcher.submit(_rows(0, 1))
        wait_for(recorder.entered.is_set, 5, "first batch to start")
        bad = [batcher.submit(_rows(job, 3)) for job in (1, 2)]
        bad.append(batcher.submit(-_rows(3, 3) - 1))  # makes the batch fail
        wait_for(lambda: batcher.pending_frames == 9, 5, "nine frames queued")
        gate.set()
        blocker.result(5)
        for future in bad:
            with pytest.raises(RuntimeError, match="forward pass failed"):
                future.result(5)
        # The batcher carries on with the next batch.
        np.testing.assert_array_equal(batcher(_rows(4, 2), timeout=5), _rows(4, 2) * 10.0)


def test_a_failure_also_fails_the_rest_of_a_split_submission() -> None:
    recorder = _Recorder(fail=True)
    with Batcher(recorder, item_shape=(2,), max_batch=4, max_wait_ms=1) as batcher:
        future = batcher.submit(_rows(1, 10))
        with pytest.raises(RuntimeError, match="forward pass failed"):
            future.result(5)
        wait_for(lambda: batcher.pending_frames == 0, 5, "the rest of the submission dropped")
    assert recorder.sizes == [4]


def test_batch_function_with_wrong_row_count_fails_its_callers() -> None:
    with Batcher(lambda b: b[:-1], item_shape=(2,), max_batch=4, max_wait_ms=1) as batcher:
        with pytest.raises(ValueError, match="returned shape"):
            batcher(_rows(1, 3), timeout=5)


def test_batcher_validates_submissions_and_refuses_after_close() -> None:
    batcher = Batcher(_Recorder(), item_shape=(2,), max_batch=4, max_wait_ms=1)
    with pytest.raises(ValueError, match="expected"):
        batcher.submit(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="no frame"):
        batcher.submit(np.zeros((0, 2), np.float32))
    queued = batcher.submit(_rows(1, 2))
    batcher.close(5)
    np.testing.assert_array_equal(queued.result(5), _rows(1, 2) * 10.0)  # drained on close
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(_rows(1, 1))
    for bad in ({"max_batch": 0}, {"max_wait_ms": -1.0}):
        with pytest.raises(ValueError):
            Batcher(_Recorder(), item_shape=(2,), **bad)


def test_predictor_behind_a_batcher_equals_direct_prediction() -> None:
    predictor = Predictor(_tiny_vit(HEART.num_outputs), HEART, device="cpu", bf16="off")
    assert predictor.preferred_batch == 16
    jobs = [_inputs(n, seed=10 + n) for n in (3, 5, 2)]
    direct = [predictor.predict(x) for x in jobs]
    with Batcher(predictor.predict, item_shape=predictor.input_shape, max_batch=8) as batcher:
        futures = [batcher.submit(x) for x in jobs]
        batched = [f.result(30) for f in futures]
    for one, many in zip(direct, batched, strict=True):
        np.testing.assert_allclose(many, one, atol=1e-5)


# --- aggregation ---------------------------------------------------------------------------------
CINE = np.array(
    [
        [0.50, 0.30, 0.20],
        [0.50, 0.30, 0.20],
        [0.50, 0.30, 0.20],
        [0.10, 0.85, 0.05],
        [0.05, 0.05, 0.90],
    ]
)
NAMES = ("a", "b", "c")


@pytest.mark.parametrize(
    ("method", "k", "name", "probability", "best"),
    [
        ("mean", 3, "b", 0.36, 3),
        ("max", 3, "c", 0.90, 4),
        ("topk", 2, "b", 0.575, 3),
        ("topk", 3, "a", 0.50, 0),
    ],
)
def test_aggregation_methods(method: str, k: int, name: str, probability: float, best: int) -> None:
    result = aggregate(CINE, NAMES, method=method, k=k)  # type: ignore[arg-type]
    assert result.class_name == name and result.class_index == NAMES.index(name)
    assert result.probability == pytest.approx(probability)
    assert result.best_frame == best
    assert result.frames == 5 and result.method == method
    assert len(result.probabilities) == 3


def test_mean_probabilities_sum_to_one_and_topk_limits() -> None:
    mean = aggregate(CINE, NAMES)
    assert sum(mean.probabilities) == pytest.approx(1.0)
    assert mean.probabilities == pytest.approx((0.33, 0.36, 0.31))
    everything = aggregate(CINE, NAMES, method="topk", k=50)
    assert everything.k == 5 and everything.probabilities == pytest.approx(mean.probabilities)
    one = aggregate(CINE, NAMES, method="topk", k=1)
    assert one.probabilities == pytest.approx(aggregate(CINE, NAMES, method="max").probabilities)
    single = aggregate(np.array([[0.2, 0.8]], np.float32), ("x", "y"))
    assert (single.class_name, single.best_frame) == ("y", 0)


@pytest.mark.parametrize(
    ("probs", "kwargs", "match"),
    [
        (np.array([0.5, 0.5]), {}, "expected \\(frames, classes\\)"),
        (np.zeros((0, 3)), {}, "no frame"),
        (np.full((2, 2), 0.5), {}, "for the classes"),
        (np.array([[1.2, -0.2, 0.0]]), {}, "expected values in"),
        (np.array([[np.nan, 0.5, 0.5]]), {}, "NaN"),
        (np.array([[0.5, 0.3, 0.3]]), {}, "sum to"),
        (np.array([[1, 0, 0]]), {}, "dtype"),
        (CINE, {"method": "median"}, "method="),
        (CINE, {"method": "topk", "k": 0}, "k=0"),
    ],
)
def test_aggregation_validates_its_arguments(
    probs: np.ndarray, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate(probs, NAMES, **kwargs)  # type: ignore[arg-type]
