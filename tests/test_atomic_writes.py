"""Every temp-file-and-rename in the package goes through pipeline/atomic.py (fsync before the rename, the
directory entry after it, no temp left behind by a failure)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from pipeline import atomic

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Renames that are not writes of new content: directory swaps of trees fsynced just before (the Deep Lake
# version log saved as the last good one, and put back in place of an unreadable head).
ALLOWED = {"atomic.py": "the implementation", "dataset_health.py": "version-log directory swaps"}


def renames(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Calls that rename: os.rename/os.replace, and `.rename(x)` / `.replace(x)` with one argument (a Path's;
    str.replace takes two)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        if name in ("rename", "replace", "renames") and isinstance(owner, ast.Name) and owner.id == "os":
            found.append(f"{path.relative_to(root)}:{node.lineno} os.{name}")
        elif name in ("rename", "replace") and len(node.args) == 1 and not node.keywords:
            found.append(f"{path.relative_to(root)}:{node.lineno} .{name}()")
    return found


def test_the_rename_finder_sees_every_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import os\nos.replace(a, b)\nos.rename(a, b)\np.rename(q)\ntmp.replace(out)\n"
                   "s.replace('a', 'b')\ndf.rename(columns={})\n")
    assert [f.split(" ", 1)[1] for f in renames(src, tmp_path)] == ["os.replace", "os.rename", ".rename()",
                                                                    ".replace()"]


def test_no_rename_outside_atomic():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name not in ALLOWED for hit in renames(path)]
    assert found == [], "write through pipeline.atomic (write_*, temp_path, publish): " + ", ".join(found)


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_temp_path_publishes_a_file_and_a_directory(tmp_path):
    with atomic.temp_path(tmp_path / "w.pt") as tmp:
        assert tmp.parent == tmp_path and not (tmp_path / "w.pt").exists()
        torch.save({"x": torch.arange(3)}, tmp)
    assert torch.load(tmp_path / "w.pt")["x"].tolist() == [0, 1, 2]
    for version in ("old", "new"):          # a directory build replaces the previous one whole
        with atomic.temp_path(tmp_path / "model") as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(version)
            if version == "old":
                (tmp / "stale.bin").write_bytes(b"1")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]
    assert (tmp_path / "model" / "config.json").read_text() == "new"
    assert temps(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_failed_writer_leaves_the_old_content_and_no_temp(tmp_path, kind):
    target = tmp_path / "out"
    atomic.write_text(target, "old") if kind == "file" else (target.mkdir(), (target / "a").write_text("old"))
    with pytest.raises(RuntimeError):
        with atomic.temp_path(target) as tmp:
            if kind == "file":
                tmp.write_text("half")
            else:
                tmp.mkdir()
                (tmp / "a").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target.read_text() if kind == "file" else (target / "a").read_text()) == "old"
    assert temps(tmp_path) == []


def test_publish_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    """Order of events: every file of the tree fsynced, then the rename, then the target's directory."""
    events: list[str] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    names: dict[int, str] = {}

    def opened(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        names[fd] = Path(path).name
        return fd

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(f"fsync {names.get(fd, fd)}"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    src = tmp_path / "build"
    src.write_bytes(b"data")
    atomic.publish(src, tmp_path / "final.bin")
    assert events == ["fsync build", "rename", f"fsync {tmp_path.name}"]
    assert (tmp_path / "final.bin").read_bytes() == b"data"
