"""The training scripts, run as files, never leave megarec/ first on sys.path (megarec/kernels would shadow the
`kernels` package transformers imports)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megarec.entry_point import unshadow_script_dir

REPO = Path(__file__).resolve().parents[1]


def test_script_dir_is_replaced_by_the_repository_root(monkeypatch):
    script = REPO / "megarec" / "train_rec.py"
    monkeypatch.setattr(sys, "path", [str(script.parent), "/elsewhere"])
    unshadow_script_dir(str(script))
    assert sys.path == [str(REPO), "/elsewhere"]
    unshadow_script_dir(str(script))                    # another first entry is left alone
    assert sys.path == [str(REPO), "/elsewhere"]


def test_transformers_imports_from_a_script_run_as_a_file():
    for name in ("train_rec.py", "train_tokenizer.py"):
        proc = subprocess.run([sys.executable, str(REPO / "megarec" / name), "--help"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    # the situation of `deepspeed megarec/train_rec.py`: megarec/ first on sys.path, then the fix, then transformers
    code = ("import importlib.util, sys; sys.path.insert(0, %r); "
            "from megarec.entry_point import unshadow_script_dir; unshadow_script_dir(%r); "
            "import transformers.activations; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s else 'none')") % (
        str(REPO / "megarec"), str(REPO / "megarec" / "train_rec.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "megarec" not in proc.stdout
