"""The synthetic demo model: a tiny ViT trained on phantoms in minutes of CPU, for demonstrations.

It lets the whole loop — receive, analyse, SR and heatmap at the PACS — be shown and tested without
published weights: a narrow, shallow ``usf-mae-vit-b16`` (same code, same USF-MAE preprocessing,
small width) is fine-tuned from random weights on phantoms with the task's paper recipe
(:mod:`training.finetune`) and evaluated on held-out phantoms (:mod:`training.phantom_data`).

What it is not: a model of anything clinical. It has seen only phantoms. Its file is marked
``synthetic``; its algorithm name says "synthetic phantom demo", which every SR it produces carries
(TID 4019); the registry refuses to activate it without ``--allow-synthetic``.

Choices that make it fast, all recorded in the file's metadata:

- ``heart_view``: its five views differ in structures the phantom draws distinctly (chambers,
  crossing or converging vessels, the direction of colour flow). The heart-view paper's classes
  are read from colour Doppler, so the clean stage keeps solid colour-flow areas
  (``colour_flow_min_area``); a daemon that serves this model needs the same
  ``[pipeline.inpaint]`` setting (:data:`DEMO_COLOUR_FLOW_MIN_AREA`).
- 400 x 300 phantoms (:func:`~training.phantom_data.demo_phantom_params`): anatomy scaled with the
  frame, ~4x cheaper to draw and clean than 800 x 600, and colour flow still thick enough to be
  kept. Phantoms sent to a daemon running the demo model should use the same geometry.
- ViT width 96, depth 2, 3 heads, patch 32 at 224 input: 49 tokens instead of 196. On phantoms
  this learns in ~20 epochs of 800 images what patch 16 does not reach in that budget, at ~3x the
  speed; Eigen-CAM maps are 7 x 7.
- One torch thread: a model this narrow gains little from a second one, and loses ~10x when
  another process holds the other core (OpenMP barriers wait for the descheduled thread) — as on
  a 2-core host that also runs the daemon. Phantoms are drawn by two worker processes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import torch

from pipelines.clean import CleanParams
from pipelines.inpaint import InpaintParams
from pipelines.models import build_task_model, save_model_file
from training.augment import Augmentation
from training.finetune import EpochLog, evaluate, finetune, get_recipe, torch_threads
from training.phantom_data import (
    PHANTOM_TASKS,
    PhantomDataSpec,
    build_phantom_data,
    demo_phantom_params,
)

log = logging.getLogger(__name__)

ENCODER = "usf-mae-vit-b16"
#: Solid colour areas of at least this many pixels are colour Doppler and stay (heart_view).
DEMO_COLOUR_FLOW_MIN_AREA = 100
#: What the demo model is, in every place a person may see it.
PURPOSE = (
    "Synthetic demonstration model trained only on usfmd phantoms. Not a medical device; "
    "never use it for real studies."
)


def demo_algorithm_name(task: str) -> str:
    """TID 4019 Algorithm Name of a demo model: says "synthetic" (the registry insists)."""
    return f"usfmd synthetic phantom demo {task}"


def demo_clean_params() -> CleanParams:
    """The clean stage the demo trains with: the daemon's defaults, colour flow kept."""
    return CleanParams(inpaint=InpaintParams(colour_flow_min_area=DEMO_COLOUR_FLOW_MIN_AREA))


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """A demo run: task, phantom counts, run size and the tiny encoder's width.

    The recipe itself (learning rate, weight decay, schedule, loss) is the task's paper recipe;
    only the sizes here differ from it.
    """

    task: str = "heart_view"
    train: int = 800
    val: int = 100
    test: int = 200
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    width: int = 400
    height: int = 300
    embed_dim: int = 96
    depth: int = 2
    num_heads: int = 3
    patch_size: int = 32
    #: ventriculomegaly: atrial widths at least this far from the 10 mm cut-off.
    vm_margin_mm: float = 2.0
    #: Geometry per training image; ``None`` keeps the paper recipe's augmentation.
    augmentation: Augmentation | None = field(
        default_factory=lambda: Augmentation(
            rotation_deg=15.0, hflip=0.5, vflip=0.5, crop_scale=(0.7, 1.0)
        )
    )
    #: bf16 autocast: off by default, a model this narrow runs faster in fp32.
    bf16: bool | Literal["auto"] = False
    #: torch CPU threads for building, training and evaluating; ``None``: as torch has it.
    threads: int | None = 1
    #: Processes drawing and cleaning phantoms (the result does not depend on it).
    workers: int = 2
    encoding: Literal["native", "jpeg"] = "native"

    def __post_init__(self) -> None:
        if self.task not in PHANTOM_TASKS:
            raise ValueError(
                f"no demo for task {self.task!r}: phantoms label {sorted(PHANTOM_TASKS)}"
            )
        if min(self.train, self.val, self.test) < 1:
            raise ValueError("train, val and test need at least one phantom each")

    def overrides(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
        }

    def data_spec(self) -> PhantomDataSpec:
        return PhantomDataSpec(
            task=self.task,
            train=self.train,
            val=self.val,
            test=self.test,
            seed=self.seed,
            params=demo_phantom_params(self.width, self.height),
            vm_margin_mm=self.vm_margin_mm if self.task == "ventriculomegaly" else 0.0,
            encoding=self.encoding,
            clean=demo_clean_params(),
        )


@dataclass(frozen=True, slots=True)
class DemoResult:
    path: Path
    sha256: str
    algorithm_name: str
    test: dict[str, Any]
    val: dict[str, Any]
    data_seconds: float
    train_seconds: float
    seconds: float
    metadata: dict[str, Any]


def _usfmd_version() -> str:
    try:
        return importlib_metadata.version("usfmd")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def train_demo(
    config: DemoConfig,
    out: str | Path,
    *,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> DemoResult:
    """Draw phantoms, fine-tune the tiny ViT, evaluate on held-out phantoms, write the model file.

    The file (written atomically) is a usfmd model file marked ``synthetic`` whose metadata holds
    the algorithm name, the purpose, the test metrics (``metrics``, what ``usfmd models import``
    shows), the best validation epoch's metrics, the data and training records and timings.
    """
    start = time.perf_counter()
    spec = config.data_spec()
    with torch_threads(config.threads):
        torch.manual_seed(config.seed)
        model = build_task_model(config.task, ENCODER, overrides=config.overrides())
        data = build_phantom_data(spec, model.preprocessing, workers=config.workers)
        log.info(
            "demo phantoms prepared",
            extra={"task": config.task, "seconds": round(data.seconds, 2)},
        )
        result = finetune(
            model,
            data.train,
            data.val,
            get_recipe(config.task),
            epochs=config.epochs,
            batch_size=config.batch_size,
            augmentation=config.augmentation,
            bf16=config.bf16,
            seed=config.seed,
            device="cpu",
            on_epoch=on_epoch,
        )
        test = evaluate(model, data.test, batch_size=config.batch_size, bf16=result.bf16).metrics
    seconds = time.perf_counter() - start
    name = demo_algorithm_name(config.task)
    record = dataclasses.asdict(config)
    record["augmentation"] = config.augmentation.as_dict() if config.augmentation else None
    metadata: dict[str, Any] = {
        "algorithm_name": name,
        "synthetic_demo": True,
        "purpose": PURPOSE,
        "metrics": test,
        "validation": result.best_val,
        "demo": record,
        "data": spec.describe(),
        "training": result.summary(),
        "timing": {
            "data_seconds": round(data.seconds, 2),
            "train_seconds": round(result.seconds, 2),
            "total_seconds": round(seconds, 2),
            "threads": result.threads,
        },
        "usfmd_version": _usfmd_version(),
    }
    target = Path(out)
    digest = save_model_file(
        target, model, synthetic=True, metadata=metadata, inpaint=spec.clean.inpaint
    )
    return DemoResult(
        path=target,
        sha256=digest,
        algorithm_name=name,
        test=test,
        val=result.best_val,
        data_seconds=data.seconds,
        train_seconds=result.seconds,
        seconds=seconds,
        metadata=metadata,
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short human-readable table of accuracy, per-class P/R/F1 and the confusion matrix."""
    lines = [
        f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
        f"weighted F1 {metrics['weighted_f1']:.4f}  (n={metrics['n']})"
    ]
    if metrics.get("auc") is not None:
        lines.append(
            f"AUC {metrics['auc']:.4f}  sensitivity {metrics['sensitivity']:.4f}  "
            f"specificity {metrics['specificity']:.4f}"
        )
    width = max(len(n) for n in metrics["classes"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name in metrics["classes"]:
        c = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  "
            f"{c['support']:7d}"
        )
    lines.append("confusion matrix (rows: truth, columns: prediction, class order as above):")
    lines.extend("  " + " ".join(f"{v:5d}" for v in row) for row in metrics["confusion_matrix"])
    return "\n".join(lines)
