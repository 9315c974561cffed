"""The README stays true: its API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    api = [b for b in blocks if "class Net(nn.Module)" in b]
    assert api, "the README has no API example"
    code = api[0] + "\nassert isinstance(plain, Net) and vp.summary(fresh)['trainable'] > 0\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "trainable" in result.stdout
    assert (tmp_path / "out" / "net-lora" / "adapter.safetensors").is_file()


def test_install_and_test_commands_are_the_ones_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[all,test]" && ruff check . && pytest' in text
    assert 'pip install --quiet -e ".[all,test]"' in ci and "ruff check ." in ci and "pytest" in ci
