"""Claims the docs make about the code, checked against the code.

- What ``train.fit``'s ``compile`` defaults to: every sentence of the docs that names the default
  names the real one, and none says the step "compiles by default".
- Which ``fnllm.random`` samplers are bit-identical to ``jax.random``: the Getting started
  guide lists them (``<!-- docs-test: jax-identical ... -->`` and ``jax-close``); each listed
  sampler is checked against JAX.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from fnllm import random as fr
from fnllm import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts) + sorted(
    (DOCS / "examples").glob("*.py")
)


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return re.split(r"(?<=[.;:])\s+(?=[A-Z`(])", flat)


def test_docs_state_the_real_default_of_fit_compile() -> None:
    default = inspect.signature(train.fit).parameters["compile"].default
    wrong = []
    for page in PAGES:
        for s in _sentences(page.read_text(encoding="utf-8")):
            low = s.lower()
            if re.search(r"compiled by default|compiles by default|compile by default", low) or (
                "fit" in s
                and "compile" in s
                and "default" in low
                and f'"{default}"' not in s
                and f"compile={default!r}" not in s
            ):
                wrong.append(f"{page.relative_to(DOCS)}: {s[:160]}")
    assert not wrong, f"sentences about fit's compile default (it is {default!r}):\n" + "\n".join(
        wrong
    )


def _listed(kind: str) -> list[str]:
    text = (DOCS / "guides" / "getting-started.md").read_text(encoding="utf-8")
    m = re.search(rf"<!--\s*docs-test:\s*{kind}\s+([^>]*?)\s*-->", text)
    assert m, f"getting-started.md has no docs-test: {kind} list"
    names = m.group(1).split()
    prose = text[: m.start()].rsplit("\n\n", 1)[-1] + text[m.end() :].split("\n\n", 1)[0]
    for name in names:  # the sentence next to the marker names each sampler
        assert f"`{name}`" in prose or name == "key", f"{kind}: {name} not named in the prose"
    return names


def _draws(jax, name: str, seed: int):
    jr = jax.random
    k_ours, k_jax = fr.key(seed), jr.key(seed)
    shape = (3, 5)
    if name == "key":
        return fr.key(seed), jax.random.key_data(k_jax)
    if name == "split":
        return fr.split(k_ours, 3), jax.random.key_data(jr.split(k_jax, 3))
    if name == "fold_in":
        return fr.fold_in(k_ours, 7), jax.random.key_data(jr.fold_in(k_jax, 7))
    if name == "uniform":
        return fr.uniform(k_ours, shape), jr.uniform(k_jax, shape)
    if name == "normal":
        return fr.normal(k_ours, shape), jr.normal(k_jax, shape)
    if name == "bernoulli":
        return fr.bernoulli(k_ours, 0.3, shape), jr.bernoulli(k_jax, 0.3, shape)
    if name == "randint":
        return fr.randint(k_ours, shape, 0, 100), jr.randint(k_jax, shape, 0, 100)
    if name == "permutation":
        return fr.permutation(k_ours, 10), jr.permutation(k_jax, 10)
    raise AssertionError(f"no check for sampler {name!r}")


def _as_np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


@pytest.mark.parametrize("kind", ["jax-identical", "jax-close"])
def test_samplers_the_docs_call_bit_identical_to_jax_are(kind: str) -> None:
    jax = pytest.importorskip("jax")
    for name in _listed(kind):
        for seed in (0, 1, 42, 2**31 - 1):
            ours, theirs = (_as_np(a) for a in _draws(jax, name, seed))
            ours = ours.astype(theirs.dtype) if ours.dtype != theirs.dtype else ours
            if kind == "jax-identical":
                assert np.array_equal(ours, theirs), f"{name} (seed {seed}) differs from jax"
            else:
                np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=name)


def test_home_page_calls_bit_identical_only_the_samplers_tested_so() -> None:
    """The home page's line on randomness names the same samplers as Getting started: those
    before "bit-identical" are in the tested identical list, the close ones come after it."""
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    m = re.search(r"^- Randomness.*?(?=^- |^\s*$)", text, re.M | re.S)
    assert m, "index.md: no '- Randomness ...' line"
    head, found, tail = m.group(0).partition("bit-identical")
    assert found, "index.md: the randomness line no longer says which draws are bit-identical"
    identical, close = set(_listed("jax-identical")), _listed("jax-close")
    named = set(re.findall(r"`(\w+)`", head)) - {"jax"}
    assert named and named <= identical, (
        f"called bit-identical but not tested so: {named - identical}"
    )
    for name in close:
        assert f"`{name}`" not in head and f"`{name}`" in tail, f"index.md: how close {name} is"
