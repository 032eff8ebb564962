"""scenegraph: a scene graph per sampled frame — detected objects, relation triples and a compact text form.

Table `scenegraph`, keyed (video_id, frame_idx), one row for every frame of the frames stage (a frame with no
detection above `score_threshold` gets a row with no objects and empty text):

- pts: the frame's presentation time (copied from the frames row)
- objects: list of {label, score, box [x0, y0, x1, y1] normalised to [0, 1]}, best first, at most `max_objects`
- relations: list of {subject, subject_label, predicate, object, object_label, score}; subject/object index
  `objects`; at most `max_relations`
- text: "person holding cup; cup on table; dog" (see `pipeline.scenegraph.serialize`)

The backend is pluggable (`backend`: a registered name or "package.module:ClassName" implementing
`pipeline.scenegraph.SceneGraphBackend`); the default is a transformers object detector (`checkpoint`) plus the
geometric relation rules of `pipeline.scenegraph.relations`. Runs on the shared inference runner: CPU workers
decode and downscale the JPEG frames, model actors run the backend on the frames of several videos at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator

import pyarrow as pa

from ..inference.runner import Done, ItemFailure, RunnerConfig, run_inference
from ..scenegraph.frames import decode_frame, frame_graphs
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem


@dataclass
class SceneGraphConfig(StageConfig):
    name: str = "scenegraph"
    backend: str = "detector_rules"   # or "package.module:ClassName" (a SceneGraphBackend, e.g. a learned PSG model)
    checkpoint: str = "facebook/detr-resnet-50"   # any AutoModelForObjectDetection checkpoint (name or dir)
    score_threshold: float = 0.5
    max_objects: int = 20             # per frame, best first
    max_relations: int = 20           # per frame, best first
    max_side: int = 800               # frames are downscaled to at most this longest side before the model
    batch_frames: int = 16            # frames per detector call
    precision: str = "auto"           # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(batch_size=2, max_in_flight=4,
                                                                            num_cpus_preprocess=2))
    resources: Resources = field(default_factory=lambda: Resources(cpus=4, gpus=0, mem_gb=16))


def prepare_frames(item: WorkItem, max_side: int) -> Any:
    """CPU side: decode every sampled frame of the video (runs in a runner preprocessing worker)."""
    rows = sorted(item.rows("frames", "frames"), key=lambda r: int(r["frame_idx"]))
    if not rows:
        return Done(ItemResult(item.video_id, rows={}, note="no_frames"))
    images = []
    for r in rows:
        data = r.get("jpeg") or r.get("image")
        if not data:
            raise ItemFailure(f"corrupt: frame {r['frame_idx']} has no image bytes")
        try:
            images.append(decode_frame(data, max_side))
        except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad JPEGs
            raise ItemFailure(f"corrupt: frame {r['frame_idx']} does not decode: {exc}"[:500]) from None
    return {"frames": [(int(r["frame_idx"]), float(r["pts"])) for r in rows], "images": images}


class SceneGraphModel:
    """Runner model: the configured backend over all frames of a batch of videos."""

    def __init__(self, backend: str, **backend_kwargs: Any):
        from ..scenegraph.relations import backend_class

        self.backend = backend_class(backend)(**backend_kwargs)

    def predict(self, payloads: list[dict]) -> list[dict]:
        it = iter(frame_graphs(self.backend, [im for p in payloads for im in p["images"]]))
        return [{"frames": p["frames"], "graphs": [next(it) for _ in p["images"]]} for p in payloads]


_OBJECT = pa.struct([("label", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.float32(), 4))])
_RELATION = pa.struct([("subject", pa.int32()), ("subject_label", pa.string()), ("predicate", pa.string()),
                       ("object", pa.int32()), ("object_label", pa.string()), ("score", pa.float32())])
SCENEGRAPH_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("frame_idx", pa.int64()), ("pts", pa.float64()),
    ("objects", pa.list_(_OBJECT)), ("relations", pa.list_(_RELATION)), ("text", pa.string()),
])


class SceneGraphStage(Stage):
    name = "scenegraph"
    Config = SceneGraphConfig
    upstream = {"frames": ("frames",)}
    tables = {"scenegraph": ("video_id", "frame_idx")}
    schemas = {"scenegraph": SCENEGRAPH_SCHEMA}

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self._stats: dict[str, Any] = {}

    def process(self, items: Iterable[WorkItem]) -> Iterator[ItemResult]:
        cfg, ctx = self.cfg, self.ctx
        factory = partial(SceneGraphModel, backend=str(cfg.backend), checkpoint=str(cfg.checkpoint),
                          models=ctx.models, cache_dir=str(ctx.cache_dir), device=ctx.device,
                          precision=str(cfg.precision), score_threshold=float(cfg.score_threshold),
                          max_objects=int(cfg.max_objects), max_relations=int(cfg.max_relations),
                          batch_frames=int(cfg.batch_frames))
        run = run_inference(items, partial(prepare_frames, max_side=int(cfg.max_side)), factory, self.postprocess,
                            cfg.runner, device=ctx.device, log=ctx.log)
        yield from run
        self._stats = run.stats.as_dict()

    @staticmethod
    def postprocess(item: WorkItem, output: dict) -> ItemResult:
        rows = [{"video_id": item.video_id, "frame_idx": frame_idx, "pts": pts, **graph}
                for (frame_idx, pts), graph in zip(output["frames"], output["graphs"])]
        return ItemResult(item.video_id, rows={"scenegraph": rows})

    def shard_stats(self) -> dict[str, Any]:
        return dict(self._stats)


STAGE = SceneGraphStage
