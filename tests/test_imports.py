"""``import jaxattn`` stays light (the kernels need only jax and numpy), and every public name
it re-exports is documented."""

from __future__ import annotations

import subprocess
import sys

import pytest

import jaxattn

HEAVY = ("flax", "optax", "orbax", "yaml", "tqdm", "matplotlib")

PUBLIC = (
    "dot_product_attention",
    "reference",
    "attention_dropout_mask",
    "IMPLEMENTATIONS",
    "CausalMask",
    "MaskSpec",
    "PaddingMask",
    "PrefixLMMask",
    "SegmentMask",
    "SlidingWindowMask",
)


def test_import_loads_no_model_or_trainer_dependency():
    code = (
        "import sys, jaxattn; "
        "bad = {m.split('.')[0] for m in sys.modules} & " + repr(set(HEAVY)) + "; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_public_names_are_the_explicit_reexports():
    # Each public name is re-exported as ``from ... import X as X`` in jaxattn/__init__.py.
    names = {n for n in vars(jaxattn) if not n.startswith("_")}
    assert set(PUBLIC) <= names, set(PUBLIC) - names
    assert tuple(jaxattn.IMPLEMENTATIONS) == (None, "xla", "flash", "cudnn")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_have_a_docstring(name):
    value = getattr(jaxattn, name)
    if name == "IMPLEMENTATIONS":
        # A tuple carries no docstring of its own: it is documented by the argument it lists
        # the values of, every one of them named there.
        doc = jaxattn.dot_product_attention.__doc__
        assert all(f'"{impl}"' in doc for impl in value if impl is not None), doc
        assert "implementation: ``None``" in doc
        return
    doc = value.__dict__.get("__doc__") if isinstance(value, type) else value.__doc__
    assert doc and doc.strip(), f"jaxattn.{name} has no docstring of its own"


def test_unknown_names_and_subpackages_still_behave_as_usual():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        jaxattn.nope  # noqa: B018
    from jaxattn import nn  # a subpackage imports as usual

    assert nn.TinyDecoder.__module__ == "jaxattn.nn.model"
