"""Kernel-test plumbing: Triton kernels run on CPU in Triton's interpreter, in a child pytest.

Why a child process: triton.jit (and triton.language's own @jit helpers such as tl.max) pick the
interpreter from TRITON_INTERPRET when triton is first imported, which in this session has long
happened. Each kernel's interpreter cases live in tests/kernels/interpreted/<kernel>_cases.py
(not collected here: no test_ prefix); `run_interpreted_cases` runs one such file with
TRITON_INTERPRET=1 and VLSERVE_FORCE_TRITON=1 and fails with its output unless every case passed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED_DIR = Path(__file__).resolve().parent / "interpreted"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_cases(file_name: str) -> None:
    # PYTHONPATH: the case files import the batch builders next to this conftest (paged_batch).
    python_path = os.pathsep.join(filter(None, [str(INTERPRETED_DIR.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", VLSERVE_FORCE_TRITON="1", PYTHONPATH=python_path)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(INTERPRETED_DIR),
           "-c", os.devnull, str(INTERPRETED_DIR / file_name)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or " passed" not in result.stdout:
        pytest.fail(f"interpreter cases {file_name} failed (rc {result.returncode}):\n"
                    f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}", pytrace=False)


@pytest.fixture
def run_interpreted_cases():
    return _run_cases
