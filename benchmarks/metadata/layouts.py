"""The four storage layouts compared by the benchmark, each with the same write / random-read / scan API.

- ``files``: one file per modality per sample (``.jpg .npy .txt .json``) in directories of ``files_per_dir`` samples.
- ``deeplake``: one Deep Lake 4 dataset; random reads as ``ds[column][list_of_rows]``, scans via ``ds.batches()``.
- ``parquet``: Parquet files of ``rows_per_file`` rows and ``row_group_rows`` row groups (pyarrow).
- ``webdataset``: WebDataset-style tar shards plus a JSON offset index for random access.

Readers keep their handles open across calls, as a data-loader worker would; opening them is part of the work
counted by the syscall phase.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samples import Sample


@dataclass(frozen=True)
class LayoutOptions:
    write_batch: int = 256
    files_per_dir: int = 1000
    rows_per_file: int = 1000
    row_group_rows: int = 64
    shard_samples: int = 1000


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def disk_usage(root: Path) -> dict:
    """Files, directories, apparent bytes and allocated bytes (st_blocks) under `root`."""
    files = dirs = apparent = allocated = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return {"files": files, "dirs": dirs, "bytes_apparent": apparent, "bytes_on_disk": allocated}


class Reader(ABC):
    @abstractmethod
    def read(self, indices: Sequence[int]) -> list[Sample]:
        """Samples at `indices`, in that order."""

    @abstractmethod
    def scan(self, batch_size: int) -> Iterator[list[Sample]]:
        """Every sample in storage order, in batches."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Layout(ABC):
    name: str

    def __init__(self, root: Path, options: LayoutOptions = LayoutOptions()):
        self.root = Path(root)
        self.options = options

    @abstractmethod
    def write(self, samples: Sequence[Sample]) -> None:
        """Write all samples (the directory `root` must not exist yet)."""

    @abstractmethod
    def reader(self) -> Reader:
        ...


# --- one file per modality per sample ---------------------------------------------------------------------------

FILE_SUFFIXES = (".jpg", ".npy", ".txt", ".json")


class FilesLayout(Layout):
    name = "files"

    def _dir(self, index: int) -> Path:
        return self.root / f"{index // self.options.files_per_dir:05d}"

    def write(self, samples: Sequence[Sample]) -> None:
        self.root.mkdir(parents=True)
        for i, s in enumerate(samples):
            d = self._dir(i)
            if i % self.options.files_per_dir == 0:
                d.mkdir()
            (d / f"{s.key}.jpg").write_bytes(s.jpeg)
            (d / f"{s.key}.npy").write_bytes(_npy_bytes(s.embedding))
            (d / f"{s.key}.txt").write_text(s.caption, encoding="utf-8")
            (d / f"{s.key}.json").write_text(s.metadata_json, encoding="utf-8")

    def reader(self) -> Reader:
        return _FilesReader(self)


class _FilesReader(Reader):
    def __init__(self, layout: FilesLayout):
        self.layout = layout

    @staticmethod
    def _load(d: Path, key: str) -> Sample:
        return Sample(
            key,
            (d / f"{key}.jpg").read_bytes(),
            _npy_load((d / f"{key}.npy").read_bytes()),
            (d / f"{key}.txt").read_text(encoding="utf-8"),
            (d / f"{key}.json").read_text(encoding="utf-8"),
        )

    def read(self, indices: Sequence[int]) -> list[Sample]:
        from .samples import sample_key

        return [self._load(self.layout._dir(i), sample_key(i)) for i in indices]

    def scan(self, batch_size: int) -> Iterator[list[Sample]]:
        # A scan discovers samples by listing, as a loader over a directory tree must.
        batch: list[Sample] = []
        for d in sorted(p for p in self.layout.root.iterdir() if p.is_dir()):
            keys = sorted({name.rsplit(".", 1)[0] for name in os.listdir(d)})
            for key in keys:
                batch.append(self._load(d, key))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


# --- Deep Lake 4 ------------------------------------------------------------------------------------------------

DL_COLUMNS = ("key", "jpeg", "embedding", "caption", "metadata_json")


class DeepLakeLayout(Layout):
    name = "deeplake"

    def write(self, samples: Sequence[Sample]) -> None:
        import deeplake

        dim = int(samples[0].embedding.shape[0]) if samples else 768
        ds = deeplake.create(str(self.root))
        ds.add_column("key", deeplake.types.Text())
        ds.add_column("jpeg", deeplake.types.Bytes())  # the encoded JPEG as is (Image() would re-decode on read)
        ds.add_column("embedding", deeplake.types.Array(deeplake.types.Float16(), shape=[dim]))
        ds.add_column("caption", deeplake.types.Text())
        # JSON text, not types.Dict(): Dict.to_dict() returns numpy scalars and floats for ints in lists.
        ds.add_column("metadata_json", deeplake.types.Text())
        step = self.options.write_batch
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            ds.append(
                {
                    "key": [s.key for s in chunk],
                    "jpeg": [s.jpeg for s in chunk],
                    "embedding": np.stack([s.embedding for s in chunk]),
                    "caption": [s.caption for s in chunk],
                    "metadata_json": [s.metadata_json for s in chunk],
                }
            )
        ds.commit("benchmark samples")

    def reader(self) -> Reader:
        return _DeepLakeReader(self.root)


def _rows_to_samples(cols: dict) -> list[Sample]:
    return [
        Sample(k, bytes(j), np.asarray(e, dtype=np.float16), str(c), str(m))
        for k, j, e, c, m in zip(cols["key"], cols["jpeg"], cols["embedding"], cols["caption"], cols["metadata_json"])
    ]


class _DeepLakeReader(Reader):
    def __init__(self, root: Path):
        import deeplake

        self.ds = deeplake.open_read_only(str(root))

    def read(self, indices: Sequence[int]) -> list[Sample]:
        rows = [int(i) for i in indices]
        return _rows_to_samples({c: self.ds[c][rows] for c in DL_COLUMNS})

    def scan(self, batch_size: int) -> Iterator[list[Sample]]:
        for batch in self.ds.batches(batch_size):
            yield _rows_to_samples(batch)


# --- Parquet ----------------------------------------------------------------------------------------------------


def _parquet_schema(dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("jpeg", pa.binary()),
            ("embedding", pa.list_(pa.float16(), dim)),
            ("caption", pa.string()),
            ("metadata_json", pa.string()),
        ]
    )


class ParquetLayout(Layout):
    name = "parquet"

    def _file(self, file_index: int) -> Path:
        return self.root / f"part-{file_index:05d}.parquet"

    def write(self, samples: Sequence[Sample]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.root.mkdir(parents=True)
        dim = int(samples[0].embedding.shape[0]) if samples else 768
        schema = _parquet_schema(dim)
        per_file = self.options.rows_per_file
        for f, start in enumerate(range(0, len(samples), per_file)):
            chunk = samples[start : start + per_file]
            flat = pa.array(np.concatenate([s.embedding for s in chunk]), type=pa.float16())
            table = pa.table(
                {
                    "key": [s.key for s in chunk],
                    "jpeg": pa.array([s.jpeg for s in chunk], type=pa.binary()),
                    "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                    "caption": [s.caption for s in chunk],
                    "metadata_json": [s.metadata_json for s in chunk],
                },
                schema=schema,
            )
            # JPEG bytes are already compressed; only the small text columns would gain from a codec.
            pq.write_table(table, self._file(f), row_group_size=self.options.row_group_rows, compression="none")

    def reader(self) -> Reader:
        return _ParquetReader(self)


def _table_to_samples(table) -> list[Sample]:
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = np.asarray(flat, dtype=np.float16).reshape(-1, dim)
    return [
        Sample(k, j, emb[n], c, m)
        for n, (k, j, c, m) in enumerate(
            zip(
                table.column("key").to_pylist(),
                table.column("jpeg").to_pylist(),
                table.column("caption").to_pylist(),
                table.column("metadata_json").to_pylist(),
            )
        )
    ]


class _ParquetReader(Reader):
    def __init__(self, layout: ParquetLayout):
        self.layout = layout
        self.files: dict[int, object] = {}

    def _file(self, f: int):
        import pyarrow.parquet as pq

        if f not in self.files:
            self.files[f] = pq.ParquetFile(self.layout._file(f))
        return self.files[f]

    def read(self, indices: Sequence[int]) -> list[Sample]:
        # Parquet's unit of random access is the row group: read each needed group once per call.
        opts = self.layout.options
        groups: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            f, row = divmod(int(i), opts.rows_per_file)
            groups.setdefault((f, row // opts.row_group_rows), []).append(int(i))
        found: dict[int, Sample] = {}
        for (f, g), wanted in groups.items():
            group = _table_to_samples(self._file(f).read_row_group(g))
            base = f * opts.rows_per_file + g * opts.row_group_rows
            for i in wanted:
                found[i] = group[i - base]
        return [found[int(i)] for i in indices]

    def scan(self, batch_size: int) -> Iterator[list[Sample]]:
        for path in sorted(self.layout.root.glob("part-*.parquet")):
            import pyarrow as pa
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                yield _table_to_samples(pa.Table.from_batches([batch]))

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# --- WebDataset-style tar shards --------------------------------------------------------------------------------

TAR_SUFFIXES = ("jpg", "npy", "txt", "json")


class WebDatasetLayout(Layout):
    name = "webdataset"

    def write(self, samples: Sequence[Sample]) -> None:
        self.root.mkdir(parents=True)
        index: dict[str, list] = {}
        per_shard = self.options.shard_samples
        for shard, start in enumerate(range(0, len(samples), per_shard)):
            name = f"shard-{shard:06d}.tar"
            with tarfile.open(self.root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for s in samples[start : start + per_shard]:
                    payloads = (s.jpeg, _npy_bytes(s.embedding), s.caption.encode(), s.metadata_json.encode())
                    entry = [shard]
                    for suffix, data in zip(TAR_SUFFIXES, payloads):
                        info = tarfile.TarInfo(f"{s.key}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                        # tar.offset is now past the data, which is padded to whole 512-byte blocks.
                        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                        entry += [tar.offset - padded, len(data)]
                    index[s.key] = entry
        # Offsets of every member, like wids/webdataset index files: random access without scanning tars.
        (self.root / "index.json").write_text(json.dumps(index))

    def reader(self) -> Reader:
        return _TarReader(self.root)


class _TarReader(Reader):
    def __init__(self, root: Path):
        self.root = root
        self.index = json.loads((root / "index.json").read_text())
        self.handles: dict[int, io.BufferedReader] = {}

    def _member(self, shard: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(shard)
        if handle is None:
            handle = self.handles[shard] = open(self.root / f"shard-{shard:06d}.tar", "rb")
        handle.seek(offset)
        return handle.read(size)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        from .samples import sample_key

        out = []
        for i in indices:
            key = sample_key(int(i))
            shard, *spans = self.index[key]
            jpg, npy, txt, js = (self._member(shard, spans[2 * n], spans[2 * n + 1]) for n in range(4))
            out.append(Sample(key, jpg, _npy_load(npy), txt.decode(), js.decode()))
        return out

    def scan(self, batch_size: int) -> Iterator[list[Sample]]:
        batch: list[Sample] = []
        for path in sorted(self.root.glob("shard-*.tar")):
            parts: dict[str, bytes] = {}
            with tarfile.open(path, "r|") as tar:  # streaming, as WebDataset reads shards
                for member in tar:
                    key, suffix = member.name.rsplit(".", 1)
                    parts[suffix] = tar.extractfile(member).read()
                    if len(parts) == len(TAR_SUFFIXES):
                        batch.append(
                            Sample(key, parts["jpg"], _npy_load(parts["npy"]), parts["txt"].decode(), parts["json"].decode())
                        )
                        parts = {}
                        if len(batch) == batch_size:
                            yield batch
                            batch = []
        if batch:
            yield batch

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self.handles.clear()


LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (FilesLayout, DeepLakeLayout, ParquetLayout, WebDatasetLayout)
}


def make_layout(name: str, root: Path, options: LayoutOptions = LayoutOptions()) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[name](Path(root), options)
