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


@pytest.mark.processes
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


def test_the_import_contracts_name_every_kernel_module():
    """pyproject.toml's import-linter contracts (``make lint``) list the kernels by name: a
    module added at the package's top level must join them, or nothing checks what it
    imports."""
    import tomllib
    from pathlib import Path

    package = Path(jaxattn.__file__).parent
    kernels = {f"jaxattn.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    with open(package.parent / "pyproject.toml", "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    assert layers[:3] == ["jaxattn.commands", "jaxattn.train", "jaxattn.nn"]
    assert {m.strip() for m in layers[3].split(":")} == kernels
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    assert set(forbidden["source_modules"]) == kernels
    assert set(HEAVY) <= set(forbidden["forbidden_modules"])
