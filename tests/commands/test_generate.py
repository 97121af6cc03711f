"""``python -m jaxattn.commands.generate`` and cached generation on the trained tiny run."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.commands.generate import main
from jaxattn.nn.decoding import generate
from jaxattn.train import load_run, tasks


@pytest.fixture(scope="module")
def tiny(trained_tiny):
    run_dir, _ = trained_tiny
    model, config = load_run(run_dir)
    return run_dir, model, config


def run(argv) -> int:
    """main's exit status, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def answers(capsys) -> list[list[int]]:
    out = capsys.readouterr().out
    return [[int(t) for t in line.split()] for line in out.strip().splitlines()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        ("jaxattn.commands.generate: ", "python -m jaxattn.commands.generate: ")
    )
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.processes
def test_the_readme_command_copies(tiny, capsys):
    run_dir, _, _ = tiny
    assert main(["--run", str(run_dir), "--prompt", "3 4 5 6 7 8 9 10 11 12"]) == 0
    assert answers(capsys) == [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.mark.processes
def test_a_prompts_file_is_one_batch_of_answers(tiny, tmp_path, capsys):
    run_dir, _, config = tiny
    symbols = np.asarray(tasks.eval_batch(config.task).inputs[:6, 1 : config.task.length + 1])
    lines = ["# held-out prompts", ""] + [" ".join(map(str, row)) for row in symbols]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n  # the end\n")
    assert main(["--run", str(run_dir), "--prompts-file", str(path)]) == 0
    assert answers(capsys) == symbols.tolist()


@pytest.mark.processes
def test_sampling_flags_are_reproducible(tiny, capsys):
    run_dir, _, _ = tiny
    argv = ["--run", str(run_dir), "--prompt", "3 4 5 6 7 8 9 10 11 12", "--temperature", "5"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed, "--top-k", "4"]) == 0
        runs.append(answers(capsys))
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.processes
def test_the_stop_token_ends_the_answer(tiny, capsys):
    run_dir, _, _ = tiny
    argv = ["--run", str(run_dir), "--prompt", "3 4 5 6 7 8 9 10 11 12", "--stop-token", "5"]
    assert main(argv) == 0
    assert answers(capsys) == [[3, 4, 5]]


@pytest.mark.processes
def test_cached_equals_uncached_on_the_trained_model(tiny):
    _, model, config = tiny
    batch = tasks.eval_batch(config.task)
    p = tasks.prompt_length(config.task)
    prompts = np.asarray(batch.inputs[:32, :p])
    n = tasks.answer_length(config.task)
    out = np.asarray(generate(model, prompts, n))
    full = model(jnp.asarray(out[:, :-1]))  # uncached, over the whole sequence
    np.testing.assert_array_equal(out[:, p:], np.asarray(full[:, p - 1 :]).argmax(-1))
    np.testing.assert_array_equal(out[:, p:], np.asarray(batch.targets[:32, p - 1 :]))
    # The logits of every step through the cache, against the uncached ones.
    cache = model.init_cache(32, p + n)
    logits, cache = model.prefill(jnp.asarray(prompts), cache)
    np.testing.assert_allclose(logits, full[:, :p], atol=1e-5, rtol=1e-5)
    for i in range(n - 1):
        step, cache = model.decode_step(jnp.asarray(out[:, p + i]), cache)
        np.testing.assert_allclose(step, full[:, p + i], atol=1e-5, rtol=1e-5)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--prompt", "3 4 x"], "prompt: 'x' is not a token id"),
        (["--prompt", "3 16"], "prompt: token 16 is outside the vocabulary; symbols are 3..15"),
        (["--prompt", "-3 4"], "prompt: token -3 is outside the vocabulary"),
        (["--prompt", "1 3"], "prompt: token 1 is BOS, which the command adds itself"),
        (["--prompt", " "], "prompt is empty"),
        (["--prompt", " ".join(["3"] * 16)], "needs 16 + 2 (BOS, SEP) + 16 new tokens = 34"),
        (["--prompt", "3", "--max-new-tokens", "40"], "= 43 positions, but the model's max_len"),
        (["--prompt", "3", "--stop-token", "99"], "--stop-token 99 is outside the vocabulary"),
        (["--prompt", "3", "--temperature", "nan"], "--temperature: must be in [0.0, inf]"),
        (["--prompt", "3", "--top-k", "0"], "--top-k: must be an int in [1, 2147483648)"),
        (["--prompt", "3", "--top-p", "0"], "--top-p: must be in (0.0, 1.0]"),
        (["--prompt", "3", "--step", "7"], "step must be 'best', 'latest' or one of"),
        ([], "one of the arguments --prompt --prompts-file is required"),
        (["--prompt", "٣ ٤"], "prompt: '٣' is not a token id"),
        (["--prompt", "3_0"], "prompt: '3_0' is not a token id"),
        (["--prompt", "3", "--step", "²"], "step must be 'best', 'latest' or one of"),
        (
            ["--prompt", "3", "--seed", str(2**70)],
            "--seed: must be an int in [0, 9223372036854775808)",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny, capsys, argv, says):
    run_dir, _, _ = tiny
    assert run(["--run", str(run_dir), *argv]) == 2
    assert says in error_line(capsys)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"3 4\n\n3 x 5\n", "prompts.txt, line 3: 'x' is not a token id"),
        (b"# nothing\n\n", "prompts.txt holds no prompt"),
        (b"3 4 \xff\n", "prompts.txt is not UTF-8 text"),
        (b"3 4\n2 5\n", "prompts.txt, line 2: token 2 is SEP"),
        (b"\xef\xbb\xbf3 4\n7 x\n", "prompts.txt, line 2: 'x' is not a token id"),  # BOM ok
    ],
)
def test_a_bad_prompts_file_is_named(tiny, tmp_path, capsys, content, says):
    run_dir, _, _ = tiny
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert main(["--run", str(run_dir), "--prompts-file", str(path)]) == 2
    assert says in error_line(capsys)


@pytest.mark.processes
def test_a_missing_prompts_file_and_bad_run_directories(tiny, tmp_path, capsys):
    run_dir, _, _ = tiny
    assert main(["--run", str(run_dir), "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read" in error_line(capsys)
    for bad, says in [
        (tmp_path / "absent", "is not a run directory (no such directory)"),
        (tmp_path, "is not a run directory of jaxattn"),
    ]:
        assert main(["--run", str(bad), "--prompt", "3"]) == 2
        assert says in error_line(capsys)
    # A run whose checkpoints are gone.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints").mkdir()
    assert main(["--run", str(copy), "--prompt", "3"]) == 2
    assert "has no complete checkpoint yet" in error_line(capsys)


@pytest.mark.processes
def test_a_checkpoint_deleted_while_it_is_loaded_says_so(tiny, tmp_path, monkeypatch, capsys):
    # Another process (a trainer keeping its last checkpoints) deletes the step being read:
    # the line ended in "<bound method pybind11_detail_function_record_...>" or said
    # "Checkpoint at ... not found".
    import orbax.checkpoint as ocp

    run_dir, _, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    restore = ocp.CheckpointManager.restore
    deleted = []

    def deleted_first(self, step, *args, **kwargs):
        if "params" in kwargs["args"].keys():
            deleted.append(copy / "checkpoints" / str(step))
            shutil.rmtree(deleted[-1] / "params" / "ocdbt.process_0")
            shutil.rmtree(deleted[-1])
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", deleted_first)
    assert main(["--run", str(copy), "--prompt", "3 4 5 6 7 8 9 10 11 12"]) == 2
    assert error_line(capsys) == (
        f"jaxattn.commands.generate: {deleted[0]} disappeared while it was being read "
        "(deleted by another process?); run the command again"
    )
