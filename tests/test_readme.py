"""The README's API example runs as written."""
import re
from pathlib import Path

import torch

def test_readme_api_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no python example"
    ns = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["means"].shape == (7, 32, 16) and ns["samples"]["b"].shape == (8, 784)
    assert torch.isfinite(ns["log_px"]).all() and ns["log_px"].shape == (32,)
