"""Scene graph <-> compact text and table rows.

Text form, for the language model: relation clauses best first, then the objects no relation mentions, joined
by "; ", e.g. "person holding cup; cup on table; dog". A label that occurs more than once in the frame gets
its occurrence number ("person 1 next to person 2") so clauses stay unambiguous; an empty graph is "".
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .relations import Relation, SceneGraph, SceneObject


def object_names(objects: list[SceneObject]) -> list[str]:
    """Display names: the label, numbered in detection order where the label repeats."""
    totals = Counter(o.label for o in objects)
    seen: Counter[str] = Counter()
    names = []
    for o in objects:
        seen[o.label] += 1
        names.append(f"{o.label} {seen[o.label]}" if totals[o.label] > 1 else o.label)
    return names


def to_text(graph: SceneGraph, max_clauses: int | None = None) -> str:
    names = object_names(graph.objects)
    clauses = [f"{names[r.subject]} {r.predicate} {names[r.object]}" for r in graph.relations]
    mentioned = {i for r in graph.relations for i in (r.subject, r.object)}
    clauses += [names[i] for i in range(len(graph.objects)) if i not in mentioned]
    if max_clauses is not None:
        clauses = clauses[:max_clauses]
    return "; ".join(clauses)


def to_columns(graph: SceneGraph) -> dict[str, Any]:
    """The objects / relations / text columns of a `scenegraph` table row."""
    objects = [{"label": o.label, "score": float(o.score), "box": [float(v) for v in o.box]}
               for o in graph.objects]
    relations = [{"subject": r.subject, "subject_label": graph.objects[r.subject].label,
                  "predicate": r.predicate, "object": r.object, "object_label": graph.objects[r.object].label,
                  "score": float(r.score)} for r in graph.relations]
    return {"objects": objects, "relations": relations, "text": to_text(graph)}


def from_columns(row: dict[str, Any]) -> SceneGraph:
    """Inverse of `to_columns` (for readers of the table)."""
    objects = [SceneObject(o["label"], o["score"], tuple(o["box"])) for o in row.get("objects") or []]
    relations = [Relation(r["subject"], r["predicate"], r["object"], r["score"]) for r in row.get("relations") or []]
    return SceneGraph(objects, relations)
