"""Scene graphs of still frames: the decoding every backend is fed (RGB, downscaled) and a backend run over a list
of frames that pairs graphs with frames by position, one per frame or an error. Used by the scenegraph stage for
video frames and by the VQA features for still images, so both see the same pixels and the same text."""
from __future__ import annotations

from typing import Any

import numpy as np

from .relations import SceneGraphBackend
from .serialize import to_columns


def decode_frame(data: bytes, max_side: int) -> np.ndarray:
    """JPEG bytes -> RGB uint8, longest side at most max_side (JPEG draft mode makes big frames cheap)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) > max_side:
            im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.BICUBIC)
        return np.array(im)          # writable: torch.from_numpy warns on read-only arrays


def frame_graphs(backend: SceneGraphBackend, images: list[Any]) -> list[dict[str, Any]]:
    """The table columns (objects, relations, text) of each image's scene graph, in order."""
    graphs = list(backend.predict_frames(images))
    # Graphs are paired with frames by position: a backend returning more or fewer would shift every
    # later frame's graph onto the wrong footage.
    if len(graphs) != len(images):
        raise RuntimeError(f"scene-graph backend {type(backend).__name__} returned {len(graphs)} graphs "
                           f"for {len(images)} frames (it must return one per frame, in order)")
    return [to_columns(g) for g in graphs]
