"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    grads, trainable = scope["grads"], scope["trainable"]
    tree = scope["tree"]
    assert tree.paths(grads) == tree.paths(trainable)
    per_example = scope["per_example"]
    for g, p in zip(tree.leaves(per_example), tree.leaves(trainable)):
        assert g.shape == (8, *p.shape)
        assert torch.isfinite(g).all()


def test_readme_data_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    scope: dict = {}
    exec(compile(blocks[0] + blocks[1], str(README), "exec"), scope)
    batch = scope["batch"]
    assert set(batch) >= {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 12)
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS] first


def test_readme_opens_with_the_two_commands():
    lines = [x for x in README.read_text().splitlines() if x.strip()]
    assert lines[1] == "```bash"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")
