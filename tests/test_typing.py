"""mypy, with the project's configuration (``[tool.mypy]`` in pyproject.toml), finds
nothing in the product packages.

A ``# type: ignore[code]`` in them is for a dependency whose types are wrong or that
makes its names at run time, with a comment saying which.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The product packages (those tests/test_layering.py holds to its rules); ``orthanc``
#: has no ``__init__.py``, so each is named with ``-p``.
PRODUCT_PACKAGES = ("dicom_node", "twin_archive", "registry", "pipelines", "trainer", "orthanc")


@pytest.mark.slow  # a first run (no .mypy_cache) takes 40 s of a core, 1.5 min under load
@pytest.mark.timeout(900)
def test_mypy_finds_nothing_in_the_product_packages() -> None:
    packages = [arg for name in PRODUCT_PACKAGES for arg in ("-p", name)]
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
                          *packages], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, f"mypy (exit status {run.returncode}):\n{run.stdout}{run.stderr}"
