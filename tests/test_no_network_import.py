"""Importing the package (every module of it) makes no network call and starts no program: checked in a network
namespace with no interface up (where unshare is available) and with Python's sockets and process spawning
patched to raise, so a native library, a Python socket and a `wget` child (what panns_inference does at import)
are all caught."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Any socket connection, DNS lookup or child process raises; the imports below must still succeed.
PRELUDE = """
import os, socket, subprocess
def _blocked(*args, **kwargs):
    raise OSError("network access attempted during import")
socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.getaddrinfo = _blocked
socket.create_connection = _blocked
def _no_child(*args, **kwargs):
    raise OSError(f"process started during import: {args[:1]}")
subprocess.Popen._execute_child = _no_child
os.system = _no_child
os.posix_spawn = _no_child
os.posix_spawnp = _no_child
"""

IMPORTS = """
import importlib, pkgutil, sys
import pipeline
names = sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")
               if not m.name.endswith(".__main__"))  # entry points: importing one runs it
for name in names:
    importlib.import_module(name)
import pipeline.models.panns as panns
assert len(panns.audioset_labels()) == 527
assert "panns_inference" not in sys.modules
print(f"imports-ok {len(names)}")
"""


def _netns_prefix() -> list[str]:
    """`unshare -rn`: a new network namespace (only a downed loopback) for the child, when the kernel allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def test_importing_every_module_makes_no_network_call_and_starts_no_program():
    proc = subprocess.run([*_netns_prefix(), sys.executable, "-c", PRELUDE + IMPORTS], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = int(proc.stdout.split("imports-ok ")[1].split()[0])
    assert count >= 40  # the walk found the whole package, not just its top


@pytest.mark.parametrize("code,message", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "network access attempted"),
    ("import subprocess\nsubprocess.run(['wget', '-q', 'http://127.0.0.1:9/x'])\n", "process started"),
])
def test_the_guard_does_block_sockets_and_children(code, message):
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr


def test_the_namespace_has_no_network():
    prefix = _netns_prefix()
    if not prefix:
        pytest.skip("unshare -rn is not permitted here; the Python-level guard still runs")
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and ("unreachable" in proc.stderr.lower() or "refused" in proc.stderr.lower())
