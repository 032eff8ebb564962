"""Scene graphs per frame: detected objects, relation triples and a compact text form.

`relations` holds the data types, the relation rules and the pluggable `SceneGraphBackend`; `serialize` the
text and table forms. Importing this package loads no model and makes no network call.
"""
from .relations import (PREDICATES, DetectorRulesBackend, Relation, SceneGraph, SceneGraphBackend, SceneObject,
                        backend_class, relate)
from .serialize import from_columns, to_columns, to_text

__all__ = ["PREDICATES", "DetectorRulesBackend", "Relation", "SceneGraph", "SceneGraphBackend", "SceneObject",
           "backend_class", "relate", "from_columns", "to_columns", "to_text"]
