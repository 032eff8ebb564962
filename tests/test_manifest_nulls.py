"""A Parquet manifest with a missing id or url is a one-line ConfigError naming the entry, not a traceback."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest


@pytest.mark.parametrize("ids,urls", [(["a", None], ["/a.mp4", "/b.mp4"]), (["a", "b"], ["/a.mp4", None]),
                                      (["a", ""], ["/a.mp4", "/b.mp4"])])
def test_null_or_empty_entries_are_refused_with_their_row(tmp_path, ids, urls):
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"video_id": pa.array(ids, pa.string()), "url": pa.array(urls, pa.string())}), p)
    with pytest.raises(ConfigError, match="entry 2 .* empty video id or url"):
        read_manifest(p)
