"""Checkpoints as we go, and what it takes to trust one (issue 9, points 2 and 4).

One small run is trained per module; each test that damages a run copies it first. Every
failure case shows first what the damage would have done unchecked (plain Orbax restores
flipped bytes; an edited ``num_heads`` keeps every shape), then that ``load_run`` refuses
it with one line naming the file or the key, and never returns a model.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, SHORT_RUN, TINY
from flax import nnx

from jaxattn.train.checkpoints import Checkpoints, model_spec, spec_fingerprint
from jaxattn.train.config import load_config
from jaxattn.train.load import load_run
from jaxattn.train.loop import train
from jaxattn.train.rundir import RunError
from jaxattn.train.steps import abstract_model

TMP = ".orbax-checkpoint-tmp"  # Orbax's name for a step that is still being written


# A 30-step run with an evaluation and a checkpoint every 10 steps (1.0 is not reached in
# 30 steps: every step runs).
SHORT = (*SHORT_RUN, "train.steps=30", "model.num_layers=2")


def run_config(run_dir, *overrides):
    return load_config(
        TINY, [f"train.run_dir={run_dir}", *SHORT, "train.keep_checkpoints=2", *overrides]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(run_dir, result, saves)``: a 30-step run checkpointed at steps 10, 20 and 30;
    ``saves`` holds, for each save, the step and the checkpoints on disk when it began."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    saves = []
    real_save = Checkpoints.save

    def recording_save(self, step, *args, **kwargs):
        self.wait()  # what save does first: the previous one, written in the background
        saves.append((step, sorted(p.name for p in self.directory.iterdir())))
        return real_save(self, step, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoints, "save", recording_save)
        result = train(run_config(run_dir), log=lambda _: None)
    return run_dir, result, saves


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run that a test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy, symlinks=True)
    return copy


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and 0 < len(message) < 400, message
    return message


def param_leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def same_params(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def data_files(item_dir: Path) -> list[Path]:
    """The files holding an item's array data (OCDBT's ``d/`` directories), largest first."""
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data files under {item_dir}"
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(run_dir: Path, old: str, new: str) -> None:
    path = run_dir / "config.yaml"
    text = path.read_text()
    assert f"\n  {old}\n" in text
    path.write_text(text.replace(f"\n  {old}\n", f"\n  {new}\n"))


def shapes(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


# ------------------------------------------------------------------- written as we go


def test_checkpoints_are_written_as_we_go_keeping_the_last_k_and_the_best(trained):
    run_dir, result, saves = trained
    assert result.steps == 30 and not result.reached_target
    # A checkpoint at each evaluation, each one complete on disk before the next began.
    assert saves == [(10, []), (20, ["10"]), (30, ["10", "20"])]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    best = max(records, key=lambda r: (r["exact_match"], -r["eval_loss"]))["step"]
    # keep_checkpoints=2: the last two, and the best by held-out exact-match (then loss).
    kept = sorted({20, 30, best})
    assert names(run_dir / "checkpoints") == [str(s) for s in kept]
    with Checkpoints(run_dir / "checkpoints", read_only=True) as ckpts:
        assert ckpts.steps() == kept
        assert ckpts.latest_step() == 30
        assert ckpts.best_step() == best
        meta = ckpts.read_meta(30)
    assert json.loads((run_dir / "summary.json").read_text())["best_checkpoint"] == best
    spec = model_spec(run_config(run_dir))
    assert meta["step"] == 30
    assert meta["model_spec"] == spec and meta["fingerprint"] == spec_fingerprint(spec)


TINY_META = {"model_spec": {}, "fingerprint": spec_fingerprint({})}


def tiny_params(step):
    return {"w": np.full((3,), step, np.float32), "b": np.array(step, np.float32)}


def tiny_opt_state(step):
    return {"mu": np.full((2,), -step, np.float32)}


def like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_keep_policy_keeps_the_last_k_and_the_best_by_exact_match_then_loss(tmp_path):
    metrics = {
        1: {"exact_match": 0.1, "eval_loss": 3.0},
        2: {"exact_match": 0.9, "eval_loss": 1.0},  # the best
        3: {"exact_match": 0.9, "eval_loss": 2.0},  # as good an exact-match, higher loss
        4: {"exact_match": 0.2, "eval_loss": 0.5},
        5: {"exact_match": 0.3, "eval_loss": 0.4},  # lowest loss, lower exact-match
        6: None,  # saved when stopped between evaluations: no metrics
    }
    directory = tmp_path / "checkpoints"
    with Checkpoints(directory, keep=2) as ckpts:
        for step, m in metrics.items():
            ckpts.save(step, tiny_params(step), tiny_opt_state(step), TINY_META, m)
        assert ckpts.steps() == [2, 5, 6]
        assert ckpts.latest_step() == 6
        assert ckpts.best_step() == 2
    assert names(directory) == ["2", "5", "6"]
    with Checkpoints(directory, read_only=True) as ckpts:  # what a reader finds on disk
        assert ckpts.steps() == [2, 5, 6] and ckpts.best_step() == 2
        for step in (2, 6):
            params, opt_state, meta = ckpts.restore(
                step,
                like(tiny_params(0)),
                like(tiny_opt_state(0)),
                spec={},
                spec_source="test",
            )
            np.testing.assert_array_equal(params["w"], [step] * 3)
            np.testing.assert_array_equal(params["b"], step)
            np.testing.assert_array_equal(opt_state["mu"], [-step] * 2)
            assert meta["arrays"]["params"]["['w']"]["shape"] == [3]


def test_load_run_picks_the_best_the_latest_or_a_step(run_copy):
    # Make step 20 the best by exact-match, so that best != latest.
    (run_copy / "checkpoints" / "20" / "metrics" / "metrics").write_text(
        json.dumps({"exact_match": 1.0, "eval_loss": 9.0})
    )
    at = {step: param_leaves(load_run(run_copy, step=step)[0]) for step in (20, 30)}
    assert not same_params(at[20], at[30])
    model, config = load_run(run_copy, step="best")
    assert same_params(param_leaves(model), at[20])
    assert config.model.d_model == 64 and config.train.steps == 30
    assert same_params(param_leaves(load_run(run_copy)[0]), at[20])  # the default: best
    assert same_params(param_leaves(load_run(run_copy, step="latest")[0]), at[30])


@pytest.mark.parametrize("step", [10, 40, "first", "20", True, None, 20.0])
def test_load_run_refuses_a_step_without_checkpoint_listing_the_steps(trained, step):
    with pytest.raises(RunError) as info:
        load_run(trained[0], step=step)
    message = one_line(info.value)
    assert "[20, 30]" in message and repr(step) in message


# ----------------------------------------------------------------- damaged checkpoints


def test_flipped_bytes_in_a_parameter_file_name_the_leaf_and_return_no_model(trained, run_copy):
    step_dir = run_copy / "checkpoints" / "30"
    flip_bytes(data_files(step_dir / "params")[0])
    # The damage: plain Orbax restores the file without a word, with other values.
    checkpointer = ocp.StandardCheckpointer()
    damaged = checkpointer.restore(step_dir / "params")
    intact = checkpointer.restore(trained[0] / "checkpoints" / "30" / "params")
    checkpointer.close()
    changed = [
        jax.tree_util.keystr(path).replace("'", "")
        for (path, a), (_, b) in zip(
            jax.tree_util.tree_flatten_with_path(damaged)[0],
            jax.tree_util.tree_flatten_with_path(intact)[0],
            strict=True,
        )
        if not np.array_equal(a, b)
    ]
    assert changed
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    message = one_line(info.value)
    assert str(step_dir / "params") in message and "checksum" in message
    assert any(leaf in message.replace("'", "") for leaf in changed), (changed, message)


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [
        ("model.num_heads", "num_heads: 4", "num_heads: 2"),
        ("model.positions", "positions: sinusoidal", "positions: rotary"),
    ],
)
def test_config_edited_to_another_model_with_the_same_shapes_is_refused(
    trained, run_copy, key, old, new
):
    edit_config(run_copy, old, new)
    edited = load_config(run_copy / "config.yaml")
    # The damage: every parameter shape still fits, so a restore by shape alone is silent.
    assert shapes(abstract_model(edited)[1]) == shapes(
        abstract_model(load_config(trained[0] / "config.yaml"))[1]
    )
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    message = one_line(info.value)
    assert str(run_copy / "config.yaml") in message and key in message
    assert old.split(": ")[1] in message and new.split(": ")[1] in message


def test_config_edited_d_model_names_the_key_not_strict_false(run_copy):
    edit_config(run_copy, "d_model: 64", "d_model: 32")
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    message = one_line(info.value)
    assert "model.d_model" in message and "32" in message and "64" in message
    assert "strict" not in message


def test_a_truncated_data_file_is_one_line_naming_the_item(run_copy):
    step_dir = run_copy / "checkpoints" / "30"
    truncate(data_files(step_dir / "params")[0])
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    assert str(step_dir / "params") in one_line(info.value)


def test_a_truncated_params_metadata_is_one_line_naming_the_item(run_copy):
    step_dir = run_copy / "checkpoints" / "30"
    truncate(step_dir / "params" / "_METADATA")
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    # Not a bare JSONDecodeError: the line says which part of which checkpoint is unreadable.
    assert str(step_dir / "params") in one_line(info.value)


def _truncate_meta(ck):
    truncate(ck / "30" / "meta" / "metadata")


def _delete_meta(ck):
    (ck / "30" / "meta" / "metadata").unlink()


def _delete_meta_item(ck):
    shutil.rmtree(ck / "30" / "meta")


def _delete_params_item(ck):
    shutil.rmtree(ck / "30" / "params")


def _delete_every_step(ck):
    for step in ("20", "30"):
        shutil.rmtree(ck / step)


def _delete_checkpoints(ck):
    shutil.rmtree(ck)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_truncate_meta, ["checkpoints/30/meta"]),
        (_delete_meta, ["checkpoints/30/meta"]),
        (_delete_meta_item, ["checkpoints/30", "meta"]),
        (_delete_params_item, ["checkpoints/30", "params"]),
        (_delete_every_step, ["no complete checkpoint"]),
        (_delete_checkpoints, ["checkpoints", "no checkpoint"]),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_a_missing_or_truncated_piece_is_one_line_naming_it(run_copy, damage, named):
    damage(run_copy / "checkpoints")
    with pytest.raises(RunError) as info:
        load_run(run_copy)
    message = one_line(info.value)
    for part in named:
        assert part in message, message


def test_a_save_cut_short_is_ignored_by_readers_and_removed_by_the_next_writer(run_copy):
    ck = run_copy / "checkpoints"
    # What a kill during Orbax's save leaves: the step's temporary directory, not renamed.
    shutil.copytree(ck / "30", ck / f"40{TMP}")  # complete-looking, but never finalized
    (ck / f"50{TMP}-1700000000" / "params").mkdir(parents=True)
    with Checkpoints(ck, read_only=True) as ckpts:
        assert ckpts.steps() == [20, 30] and ckpts.latest_step() == 30
    load_run(run_copy, step="latest")
    with pytest.raises(RunError, match=r"\[20, 30\]"):
        load_run(run_copy, step=40)
    assert f"40{TMP}" in names(ck)  # readers delete nothing
    with Checkpoints(ck, keep=2) as ckpts:  # a writer (a resumed run) cleans up
        assert ckpts.steps() == [20, 30]
    assert names(ck) == ["20", "30"]
    load_run(run_copy, step=20)


def test_restore_names_the_leaf_whose_shape_or_dtype_differs(trained, tmp_path):
    with Checkpoints(tmp_path / "checkpoints", keep=2) as ckpts:
        ckpts.save(1, tiny_params(1), tiny_opt_state(1), TINY_META, None)
        wider = {"w": jax.ShapeDtypeStruct((4,), np.float32), "b": like(tiny_params(0))["b"]}
        with pytest.raises(RunError) as info:
            ckpts.restore(1, wider, spec={}, spec_source="test")
        message = one_line(info.value)
        assert "['w']" in message and "float32[3]" in message and "float32[4]" in message
        doubles = {"w": jax.ShapeDtypeStruct((3,), np.float64), "b": wider["b"]}
        with pytest.raises(RunError, match=r"\['w'\].*float64"):
            ckpts.restore(1, doubles, spec={}, spec_source="test")
    # The real model: another d_model's parameters, with the fingerprint check passed.
    run_dir = trained[0]
    narrow = load_config(TINY, ["model.d_model=32"])
    with Checkpoints(run_dir / "checkpoints", read_only=True) as ckpts:
        with pytest.raises(RunError) as info:
            ckpts.restore(
                30,
                nnx.to_pure_dict(abstract_model(narrow)[1]),
                spec=model_spec(load_config(run_dir / "config.yaml")),
                spec_source="test",
            )
    message = one_line(info.value)
    assert re.search(r"\['\w+'\].* is float32\[[\d, ]*64\] .* needs float32\[[\d, ]*32\]", message)


# ------------------------------------------------------------------ a full disk (point 4)


def test_no_space_left_inside_an_orbax_save_is_one_line_keeping_the_earlier_one(
    tmp_path, monkeypatch
):
    real_save = ocp.handlers.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):  # step 20's JSON items (meta, metrics)
        if Path(str(directory)).parent.name.startswith(f"20{TMP}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_save(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(RunError) as info:
        train(run_config(run_dir, "train.steps=20"), log=lambda _: None)
    monkeypatch.undo()
    message = one_line(info.value)
    assert "No space left on device" in message and "step 20" in message
    # The earlier checkpoint is kept, whole and loadable; nothing half-written is left
    # (Orbax's other writers of step 20 must be done before its directory is removed).
    with Checkpoints(run_dir / "checkpoints", read_only=True) as ckpts:
        assert ckpts.steps() == [10]
    load_run(run_dir, step="latest")
    assert names(run_dir / "checkpoints") == ["10"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs: room for the tiny run's checks and checkpoints, until it is filled."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        reason = getattr(err, "stderr", "") or err
        pytest.skip(f"cannot mount a tmpfs here ({str(reason).strip()}); needs root")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# Runs train.py with its disk filled (by "another program") once the first checkpoint is
# saved: check_free_space passes at the start, the second save meets a full disk.
FILL_AFTER_FIRST_SAVE = """
import os, runpy, sys
from jaxattn.train.checkpoints import Checkpoints

disk, train_py = sys.argv[1], sys.argv[2]
real_save = Checkpoints.save

def save_then_fill(self, *args, **kwargs):
    real_save(self, *args, **kwargs)
    self.wait()  # the first checkpoint is on disk (saves finish in the background)
    filler = os.path.join(disk, "filler")
    if not os.path.exists(filler):
        st = os.statvfs(disk)
        with open(filler, "wb") as f:
            f.write(bytes(st.f_bavail * st.f_frsize - 128 * 1024))

Checkpoints.save = save_then_fill
sys.argv = [train_py, *sys.argv[3:]]
runpy.run_path(train_py, run_name="__main__")
"""


@pytest.mark.processes
def test_a_real_full_disk_during_a_save_is_one_line_keeping_the_earlier_one(small_tmpfs, tmp_path):
    run_dir = small_tmpfs / "run"
    driver = tmp_path / "fill_after_first_save.py"
    driver.write_text(FILL_AFTER_FIRST_SAVE)
    overrides = [f"train.run_dir={run_dir}", *SHORT, "train.keep_checkpoints=5"]
    proc = subprocess.run(
        [sys.executable, driver, small_tmpfs, ROOT / "train.py", "--config", TINY, *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (small_tmpfs / "filler").is_file(), proc.stderr[-2000:]
    assert proc.returncode == 2, proc.stderr[-2000:]
    # The checkpoint saved before the disk filled up is kept, whole and loadable.
    assert names(run_dir / "checkpoints") == ["10"]
    load_run(run_dir, step="latest")
    # One line, not Orbax's and TensorStore's tracebacks, and it says why.
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {proc.stderr[:3000]}"
    assert lines[0].startswith("train.py: ")
    assert "No space left on device" in lines[0] and "step 20" in lines[0]


def _truncate_step_metrics(ck):
    truncate(ck / "30" / "metrics" / "metrics")


def _drop_meta_key(key):
    def damage(ck):
        path = ck / "30" / "meta" / "metadata"
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))

    damage.__name__ = f"_drop_meta_{key}"
    return damage


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_truncate_step_metrics, "checkpoints/30/metrics/metrics"),
        (_drop_meta_key("arrays"), "no key 'arrays.params'"),
        (_drop_meta_key("model_spec"), "no key 'model_spec'"),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_corrupt_step_metrics_or_incomplete_meta_is_one_line(run_copy, damage, named):
    """Orbax reads every step's metrics when it opens the directory: a truncated one was a
    JSONDecodeError naming no file. Meta without a key was a KeyError."""
    damage(run_copy / "checkpoints")
    with pytest.raises(RunError) as info:
        load_run(run_copy, step="latest")
    assert named in one_line(info.value)


def test_failed_restores_leave_the_process_hooks_as_they_were(run_copy, monkeypatch):
    """Orbax's leftover threads are silenced only while the failed call settles; after it
    only Orbax's own leftovers are dropped: a user's process hears everything else."""
    import logging
    import sys
    import threading
    import types

    heard = []
    monkeypatch.setattr(sys, "unraisablehook", heard.append)
    before = (threading.excepthook, logging.getLogger("absl").filters[:])
    for path in data_files(run_copy / "checkpoints" / "30" / "params"):
        truncate(path)
    with pytest.raises(RunError):
        load_run(run_copy, step="latest")
    assert (threading.excepthook, logging.getLogger("absl").filters[:]) == before
    theirs = types.SimpleNamespace(object=None, exc_value=RuntimeError("user's"))
    sys.unraisablehook(theirs)
    assert heard[-1] is theirs


# ------------------------------------------------------- a checkpoint deleted while read

AGAIN = "(deleted by another process?); run the command again"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@pytest.mark.parametrize(
    ("item", "doomed", "says"),
    [
        ("meta", ".", f"{{step}} disappeared while it was being read {AGAIN}"),
        ("params", ".", f"{{step}} disappeared while it was being read {AGAIN}"),
        (
            "params",
            "params/manifest.ocdbt",
            "{step} became incomplete while it was being read: params/manifest.ocdbt "
            f"disappeared {AGAIN}",
        ),
        (
            "params",
            "params/ocdbt.process_0",
            "{step} became incomplete while it was being read: params/ocdbt.process_0/",
        ),
        (
            "meta",
            "meta/metadata",
            "{step} became incomplete while it was being read: meta/metadata "
            f"disappeared {AGAIN}",
        ),
    ],
    ids=["step before meta", "step before params", "manifest", "data folder", "meta file"],
)
def test_a_checkpoint_deleted_while_it_is_read_says_so(run_copy, monkeypatch, item, doomed, says):
    # The data folder's case ended in "See full TensorStore details: <bound method
    # pybind11_detail_function_record_...".
    step_dir = run_copy / "checkpoints" / "30"
    restore = ocp.CheckpointManager.restore

    def deleted_first(self, step, *args, **kwargs):  # by another process, as Orbax reads
        if item in kwargs["args"].keys() and (step_dir / doomed).exists():
            _remove(step_dir / doomed)
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", deleted_first)
    with pytest.raises(RunError) as info:
        load_run(run_copy, step="latest")
    message = one_line(info.value)
    assert message.startswith(says.format(step=step_dir)), message
    assert "<bound method" not in message and "object at 0x" not in message


def test_a_step_deleted_once_chosen_says_so(run_copy, monkeypatch):
    """Between listing the steps and reading the one chosen (a trainer keeping its last
    checkpoints deletes the oldest)."""
    step_dir = run_copy / "checkpoints" / "30"
    restore = Checkpoints.restore

    def deleted_first(self, step, *args, **kwargs):
        shutil.rmtree(self.step_dir(step))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "restore", deleted_first)
    with pytest.raises(RunError) as info:
        load_run(run_copy, step="latest")
    assert one_line(info.value) == f"{step_dir} disappeared while it was being read {AGAIN}"


def test_a_missing_data_folder_is_named_without_tensorstore_reprs(run_copy):
    # It was "...: cannot read the checkpoint (Encountered error while reading array index:
    # (slice(0, 64, 1), slice(0, 64, 1)). See full TensorStore details: <bound method
    # pybind11_detail_function_record_...)".
    step_dir = run_copy / "checkpoints" / "30"
    shutil.rmtree(step_dir / "params" / "ocdbt.process_0")
    with pytest.raises(RunError) as info:
        load_run(run_copy, step="latest")
    message = one_line(info.value)
    assert message.startswith(f"{step_dir / 'params'}: cannot read the checkpoint ("), message
    assert "<bound method" not in message and "object at 0x" not in message


def test_reasons_never_hold_an_objects_repr():
    """What TensorStore raises: an outer error holding a bound method's repr (its spec, a
    hundred lines), wrapping the error that says what went wrong."""
    from jaxattn.train import _orbax_errors as errors

    inner = ValueError('FAILED_PRECONDITION: Error reading "embed.embedding/0.0": Truncated')
    outer = Exception(
        "Encountered error while reading array index: (slice(0, 64, 1),). See full "
        "TensorStore details: <bound method pybind11_detail_function_record_v1.spec of "
        "TensorStore({\n  'base': {'driver': 'zarr'},\n})>"
    )
    outer.__cause__ = inner
    assert errors.reason(outer) == str(inner)
    alone = Exception(outer.args[0])
    assert errors.reason(alone) == (
        "Encountered error while reading array index: (slice(0, 64, 1),)."
    )
    held = RuntimeError("cannot restore <orbax.checkpoint.Handler object at 0x7f3a2c0e1d90>")
    assert errors.reason(held) == "cannot restore Handler"
