"""Importing the package (and reading its shipped AudioSet labels) makes no network call."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Any socket connection or DNS lookup raises; the imports below must still succeed.
PRELUDE = """
import socket
def _blocked(*args, **kwargs):
    raise OSError("network access attempted during import")
socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.getaddrinfo = _blocked
socket.create_connection = _blocked
"""

IMPORTS = """
import sys
import pipeline
import pipeline.models.panns as panns
import pipeline.models.detector
import pipeline.scenegraph
import pipeline.stages.audio
import pipeline.stages.scenegraph
assert len(panns.audioset_labels()) == 527
assert "panns_inference" not in sys.modules
print("imports-ok")
"""


def test_imports_make_no_network_call():
    proc = subprocess.run([sys.executable, "-c", PRELUDE + IMPORTS], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imports-ok" in proc.stdout


def test_the_guard_does_block_sockets():
    code = PRELUDE + "import socket\nsocket.create_connection(('127.0.0.1', 9))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "network access attempted" in proc.stderr
