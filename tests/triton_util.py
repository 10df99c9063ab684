"""Shared plumbing for the Triton kernel tests.

``test_triton_*`` tests run compiled on CUDA, and on CPU in Triton's interpreter through
:func:`run_in_interpreter`, which re-runs a test file's Triton tests in a subprocess with
TRITON_INTERPRET=1 (Triton reads the variable when it is first imported).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarec.kernels._dispatch import interpret_mode, triton_available


def triton_device() -> str | None:
    """Where Triton kernels can run in this process: "cuda", "cpu" (interpreter) or None."""
    if not triton_available():
        return None
    if interpret_mode():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


needs_triton = pytest.mark.skipif(triton_device() is None,
                                  reason="needs CUDA or TRITON_INTERPRET=1 (see test_triton_kernels_in_interpreter)")
needs_interpreter_subprocess = pytest.mark.skipif(interpret_mode() or not triton_available(),
                                                  reason="runs the interpreter subprocess")


def run_in_interpreter(test_file: str) -> None:
    """Run ``test_file``'s Triton tests under TRITON_INTERPRET=1; every one must pass, none skip."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", str(Path(test_file)), "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "triton and not in_interpreter and not bf16"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.stdout[-2000:]
