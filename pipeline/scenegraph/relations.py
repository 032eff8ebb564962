"""Scene graphs from detections: relation rules over geometry and category priors, and the backend interface.

Boxes are normalised `[x0, y0, x1, y1]` in [0, 1] with y pointing down (image convention). For every unordered
pair of detected objects the rules below are tried in both directions, in priority order; the first rule that
matches a direction gives that direction's predicate. Of the two directions the one with the higher-priority
predicate wins; on a tie the subject is the person (if exactly one of them is), else the smaller box, so that
the text reads "cup on table", "lamp above table", "person next to dog". At most one predicate per pair.

Rules (s = subject box, o = object box; w/h = width/height; "h-overlap" = length of the shared x-range):

1. **holding** — s is a person, o is a hand-held category (`HOLDABLE`), o is at most half the area of s and at
   least 60 % of o lies inside s. Confidence: the inside fraction.
2. **riding** — s is a person, o is a rideable category (`RIDEABLE`), the h-overlap covers at least half of s's
   width, s's top is above o's top and s's bottom edge lies inside o's vertical extent (the person sits on it).
   Confidence: h-overlap / w(s).
3. **on** — o is a support surface (`SUPPORTS`) or at least 4x the area of s; the h-overlap covers at least
   half of s's width; s's bottom edge lies in o's upper half (from 5 % of h(o) above o's top down to o's
   vertical centre), and s's centre is above o's centre. Confidence: h-overlap / w(s).
4. **in front of** — the boxes overlap by at least 20 % of the smaller box, and s's bottom edge is lower than
   o's by more than 5 % of the taller box's height. On a ground plane, the object whose contact point is
   lower in the image is nearer the camera. Confidence: the overlap fraction.
5. **behind** — the mirror of 4 (s's bottom edge higher than o's).
6. **above** — s ends above o (s's bottom edge at most 2 % of the image below o's top) and the h-overlap is at
   least 30 % of the narrower box. Confidence: h-overlap / narrower width.
7. **below** — the mirror of 6.
8. **next to** — the vertical overlap is at least half of the shorter box (side by side at a similar
   height), the horizontal gap is at most half the wider box's width and IoU is below 0.5.
   Confidence: vertical overlap / shorter height.

A relation's score is `score(s) * score(o) * confidence`. Category names are matched lower-case, so COCO
(DETR/YOLOS), Objects365 or LVIS style label sets all work for the common categories.

`SceneGraphBackend` is what the scenegraph stage runs on the inference runner: frames in, scene graphs out. The
default `DetectorRulesBackend` is an object detector plus these rules; a learned (panoptic) scene-graph model
can replace it by implementing `predict_frames` and being named in the stage config
(`backend: "package.module:ClassName"`).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..models.detector import Box, SceneObject  # noqa: F401 - SceneObject: part of this module's interface

PERSON = frozenset({"person", "man", "woman", "boy", "girl", "child", "people", "player", "rider"})
HOLDABLE = frozenset({
    "cup", "mug", "bottle", "wine glass", "glass", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "cell phone", "phone",
    "remote", "book", "scissors", "teddy bear", "toothbrush", "hair drier", "umbrella", "handbag", "bag",
    "frisbee", "sports ball", "ball", "baseball bat", "bat", "baseball glove", "tennis racket", "racket",
    "kite", "laptop", "mouse", "keyboard", "vase", "clock", "backpack", "suitcase", "microphone", "camera",
    "guitar", "paper", "pen", "toy",
})
RIDEABLE = frozenset({"bicycle", "bike", "motorcycle", "horse", "elephant", "skateboard", "surfboard", "skis",
                      "snowboard", "boat", "scooter"})
SUPPORTS = frozenset({
    "dining table", "table", "desk", "bed", "couch", "sofa", "chair", "bench", "counter", "shelf", "toilet",
    "sink", "floor", "ground", "road", "grass", "snow", "sand", "plate", "tray", "stage", "cabinet",
})

PREDICATES = ("holding", "riding", "on", "in front of", "behind", "above", "below", "next to")


@dataclass
class Relation:
    subject: int                                # index into SceneGraph.objects
    predicate: str
    object: int
    score: float


@dataclass
class SceneGraph:
    objects: list[SceneObject] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- geometry
def width(b: Box) -> float:
    return max(0.0, b[2] - b[0])


def height(b: Box) -> float:
    return max(0.0, b[3] - b[1])


def area(b: Box) -> float:
    return width(b) * height(b)


def h_overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0]))


def v_overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def intersection(a: Box, b: Box) -> float:
    return h_overlap(a, b) * v_overlap(a, b)


def iou(a: Box, b: Box) -> float:
    inter = intersection(a, b)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _frac(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _is(label: str, category: frozenset[str]) -> bool:
    return label.lower() in category


# ---------------------------------------------------------------------------------------------- rules
# Each rule: (subject label, subject box, object label, object box) -> confidence in (0, 1], or None.
def rule_holding(sl: str, s: Box, ol: str, o: Box) -> float | None:
    if not (_is(sl, PERSON) and _is(ol, HOLDABLE)) or area(o) > 0.5 * area(s):
        return None
    inside = _frac(intersection(s, o), area(o))
    return inside if inside >= 0.6 else None


def rule_riding(sl: str, s: Box, ol: str, o: Box) -> float | None:
    if not (_is(sl, PERSON) and _is(ol, RIDEABLE)):
        return None
    cover = _frac(h_overlap(s, o), width(s))
    if cover >= 0.5 and s[1] < o[1] and o[1] <= s[3] <= o[3]:
        return cover
    return None


def rule_on(sl: str, s: Box, ol: str, o: Box) -> float | None:
    if not (_is(ol, SUPPORTS) or area(o) >= 4 * area(s)):
        return None
    cover = _frac(h_overlap(s, o), width(s))
    top, mid = o[1] - 0.05 * height(o), (o[1] + o[3]) / 2
    s_centre = (s[1] + s[3]) / 2
    if cover >= 0.5 and top <= s[3] <= mid and s_centre < mid:
        return cover
    return None


def _occlusion(s: Box, o: Box) -> float:
    return _frac(intersection(s, o), min(area(s), area(o)))


def rule_in_front_of(sl: str, s: Box, ol: str, o: Box) -> float | None:
    overlap = _occlusion(s, o)
    if overlap >= 0.2 and s[3] - o[3] > 0.05 * max(height(s), height(o)):
        return overlap
    return None


def rule_behind(sl: str, s: Box, ol: str, o: Box) -> float | None:
    return rule_in_front_of(ol, o, sl, s)


def rule_above(sl: str, s: Box, ol: str, o: Box) -> float | None:
    shared = _frac(h_overlap(s, o), min(width(s), width(o)))
    if s[3] <= o[1] + 0.02 and shared >= 0.3:
        return shared
    return None


def rule_below(sl: str, s: Box, ol: str, o: Box) -> float | None:
    return rule_above(ol, o, sl, s)


def rule_next_to(sl: str, s: Box, ol: str, o: Box) -> float | None:
    side = _frac(v_overlap(s, o), min(height(s), height(o)))
    gap = max(0.0, max(s[0], o[0]) - min(s[2], o[2]))
    if side >= 0.5 and gap <= 0.5 * max(width(s), width(o)) and iou(s, o) < 0.5:
        return side
    return None


Rule = Callable[[str, Box, str, Box], "float | None"]
RULES: tuple[tuple[str, Rule], ...] = (
    ("holding", rule_holding), ("riding", rule_riding), ("on", rule_on), ("in front of", rule_in_front_of),
    ("behind", rule_behind), ("above", rule_above), ("below", rule_below), ("next to", rule_next_to),
)
# in front of/behind and above/below are mirror pairs: the same rank, so the tie-break picks the direction
_RANK = {"holding": 0, "riding": 1, "on": 2, "in front of": 3, "behind": 3, "above": 4, "below": 4,
         "next to": 5}


def first_match(sl: str, s: Box, ol: str, o: Box) -> tuple[str, float] | None:
    """The highest-priority predicate that holds for (subject, object), with its confidence."""
    for predicate, rule in RULES:
        conf = rule(sl, s, ol, o)
        if conf is not None and conf > 0:
            return predicate, min(1.0, conf)
    return None


def relate(objects: Sequence[SceneObject], max_relations: int = 20) -> list[Relation]:
    """Relations between detected objects by the rules above, best score first, at most `max_relations`."""
    out: list[Relation] = []
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            candidates = []
            for si, oi, s, o in ((i, j, a, b), (j, i, b, a)):
                m = first_match(s.label, tuple(s.box), o.label, tuple(o.box))
                if m is not None:
                    person_first = 0 if _is(s.label, PERSON) and not _is(o.label, PERSON) else 1
                    candidates.append((_RANK[m[0]], person_first, area(tuple(s.box)), si, oi, m))
            if not candidates:
                continue
            *_, si, oi, (predicate, conf) = min(candidates, key=lambda c: c[:3])
            score = objects[si].score * objects[oi].score * conf
            out.append(Relation(si, predicate, oi, float(score)))
    out.sort(key=lambda r: -r.score)
    return out[:max_relations]


# ---------------------------------------------------------------------------------------------- backends
class SceneGraphBackend(ABC):
    """Frames in, scene graphs out; runs inside an inference-runner model actor.

    Implementations are built with keyword arguments from the stage config (`checkpoint`, `models`,
    `cache_dir`, `device`, `precision`, `score_threshold`, `max_objects`, `max_relations`, `batch_frames`) and
    must accept and ignore the ones they don't use.
    """

    @abstractmethod
    def predict_frames(self, images: list[Any]) -> list[SceneGraph]:
        """images: RGB uint8 arrays (H, W, 3). One SceneGraph per image, boxes normalised to [0, 1]."""


class DetectorRulesBackend(SceneGraphBackend):
    """An object detector (transformers, any `AutoModelForObjectDetection` checkpoint) + the rules above."""

    def __init__(self, checkpoint: str, models: str = "real", cache_dir: str | None = None, device: str = "cpu",
                 precision: str = "auto", score_threshold: float = 0.5, max_objects: int = 20,
                 max_relations: int = 20, batch_frames: int = 8, **_: Any):
        from ..models.detector import load_detector

        self.detector = load_detector(checkpoint, models=models, cache_dir=cache_dir, device=device,
                                      precision=precision, score_threshold=score_threshold,
                                      max_objects=max_objects)
        self.max_relations = max_relations
        self.batch_frames = max(1, batch_frames)

    def predict_frames(self, images: list[Any]) -> list[SceneGraph]:
        graphs: list[SceneGraph] = []
        for start in range(0, len(images), self.batch_frames):
            for objects in self.detector.detect(images[start:start + self.batch_frames]):
                graphs.append(SceneGraph(objects, relate(objects, self.max_relations)))
        return graphs


BACKENDS: dict[str, str] = {"detector_rules": "pipeline.scenegraph.relations:DetectorRulesBackend"}


def backend_class(name: str) -> type[SceneGraphBackend]:
    """A registered backend name, or "package.module:ClassName" for one living elsewhere."""
    target = BACKENDS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown scene-graph backend {name!r}; use one of {sorted(BACKENDS)} "
                         f"or 'package.module:ClassName'")
    module, cls_name = target.split(":", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, SceneGraphBackend)):
        raise TypeError(f"{target} is not a SceneGraphBackend")
    return cls
