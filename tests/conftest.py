"""Strict settings for the whole suite, the float64 oracle every fast path is checked
against (jaxattn.reference, the textbook formula), and what the trainer's tests share: the
repository's root, the default config, the one short run they cut it to, and the README's
trained tiny run.

Tests that start Python processes (train.py, commands, several JAX processes) are marked
``processes``: ``pytest -m "not processes"`` leaves them out (a quick pass)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The suite compiles about 5000 small programs, and on CPU XLA's newer fusion emitters take
# about twice as long to compile them as its classic emitters (measured on the kernels'
# property tests: 25 s of compilation against 14 s; the suite 11m45s against 9m58s on 2
# cores). Only how XLA generates CPU code changes, before the first backend starts, for the
# workers and every process the tests start (the environment carries it); what each test
# checks is checked against float64 oracles either way. JAXATTN_TEST_XLA_DEFAULTS=1 keeps
# XLA's defaults (make test-floors does, so CI runs a subset both ways).
SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if not os.environ.get("JAXATTN_TEST_XLA_DEFAULTS"):
    if SUITE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jaxattn import reference  # noqa: E402

# Implicit rank promotion hides broadcasting bugs; the package must never rely on it.
jax.config.update("jax_numpy_rank_promotion", "raise")
# On NVIDIA GPUs float32 matmuls default to TF32 (10-bit mantissa: errors of 1e-3 against the
# float64 reference, seen on an H200); the tolerances here are float32's, as on CPU and TPU.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache per pytest run, shared by its workers and by every process
# the tests start (the environment carries its directory): the programs many tests build
# alike (the short run's steps, its evaluation, the initialisation, train.py's) compile once
# per run, not once per test. A fresh directory per run keeps runs independent; a test that
# names its own cache keeps it. In the workers, programs that compile in under 0.5 s are not
# worth a file; the commands the tests start cache every program, as they do for a user.
_CACHE = "JAX_COMPILATION_CACHE_DIR"
_MIN_SECONDS = 0.5


def _use_the_run_cache() -> None:
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_SECONDS)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the cache
        return
    config.jaxattn_cache = tempfile.mkdtemp(prefix="jaxattn-tests-jit-")
    os.environ[_CACHE] = config.jaxattn_cache
    _use_the_run_cache()


def pytest_unconfigure(config):
    if getattr(config, "jaxattn_cache", None):
        shutil.rmtree(config.jaxattn_cache, ignore_errors=True)


if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_CACHE):
    _use_the_run_cache()


def xla_flags(*more: str) -> str:
    """``XLA_FLAGS`` for a process a test starts with flags of its own (``more``, e.g.
    ``--xla_force_host_platform_device_count=4``), keeping the suite's."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *more]).strip()


ROOT = Path(__file__).resolve().parents[1]  # the repository
TINY = ROOT / "configs" / "tiny.yaml"  # the default run
# The short run the trainer's tests take: tiny.yaml cut to 20 steps, evaluated on 64
# held-out sequences and checkpointed at steps 10 and 20, on a 1-layer model (it compiles
# faster; nothing those tests check depends on depth), quiet. A test states what differs.
SHORT_RUN = (
    "train.progress=false",
    "train.pictures=false",
    "train.steps=20",
    "train.eval_every=10",
    "train.steps_per_call=10",
    "task.eval_size=64",
    "model.num_layers=1",
)


def short_config(run_dir, *overrides):
    """``SHORT_RUN`` of tiny.yaml into ``run_dir``, then ``overrides``."""
    from jaxattn.train.config import load_config

    return load_config(TINY, [*SHORT_RUN, f"train.run_dir={run_dir}", *overrides])


settings.register_profile(
    "jaxattn",
    deadline=None,  # every new shape compiles once; wall time per example is not the point
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI runs the same examples every time
)
settings.load_profile("jaxattn")


# Jitted: run eagerly, every jnp op of the formula would compile on its own for each new shape.
_reference64 = jax.jit(
    reference.dot_product_attention,
    static_argnames=(
        "is_causal",
        "return_weights",
        "return_residual",
        "dropout_rate",
        "logits_soft_cap",
    ),
)


def reference_attention(q, k, v, mask=None, bias=None, scale=None, **kwargs):
    # (mask, bias) in this order, keyword-friendly; the kernels take (bias, mask) positionally.
    """The oracle: :func:`jaxattn.reference.dot_product_attention` run in float64.

    Inputs (arrays of any float dtype, a bool mask or a mask of :mod:`jaxattn.masks`) are
    cast to float64; returns (out ``[..., T, N, Hv]``, weights ``[..., N, T, S]``) as NumPy
    float64. ``kwargs`` go to the reference (``is_causal``, ``dropout_rate``, ...).
    """
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        if bias is not None:
            bias = jnp.asarray(np.asarray(bias, np.float64))
        result = _reference64(q, k, v, bias, mask, scale=scale, return_weights=True, **kwargs)
        return tuple(np.asarray(x) for x in result)


def qkv(rng, batch, t, s, n, k, h, hv=None, dtype=np.float32):
    """Random query ``[*batch, T, N, H]``, key ``[*batch, S, K, H]``, value
    ``[*batch, S, K, Hv]``."""
    hv = h if hv is None else hv
    q = rng.standard_normal((*batch, t, n, h)).astype(dtype)
    key = rng.standard_normal((*batch, s, k, h)).astype(dtype)
    v = rng.standard_normal((*batch, s, k, hv)).astype(dtype)
    return q, key, v


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """The README's default run (``python train.py --config configs/tiny.yaml``, pictures
    on), trained until it copies every held-out sequence (about 10 s), and the lines it
    printed: once per pytest run, whatever the workers. Under
    xdist the first worker to ask trains it into the session's shared temporary directory,
    holding a lock; the others wait and read it. Read it; never write into it."""
    import fcntl
    import json
    import os
    import subprocess
    import sys

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, above each worker's own
    run_dir, log_file = shared / "tiny" / "tiny", shared / "tiny" / "train.log"
    run_dir.parent.mkdir(exist_ok=True)
    with open(shared / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log_file.exists():
            # The README's command itself (tests/train/test_steps.py checks what it prints).
            result = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "train.py"),
                    "--config",
                    "configs/tiny.yaml",
                    f"train.run_dir={run_dir}",
                    "train.progress=false",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            log_file.write_text(json.dumps(result.stdout.splitlines()))
    return run_dir, json.loads(log_file.read_text())
