"""The README's example runs as written."""

import pathlib
import re

import numpy as np


def test_readme_example_runs():
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (32, 256) and np.isfinite(scope["g"].input.astype(np.float32)).all()
