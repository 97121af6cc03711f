"""The trainer with each model kind: a prefix-LM, an encoder-decoder (copy, translate) and a
classifier train, evaluate, checkpoint, load back and draw what they can; the generate
command refuses what it cannot run, in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, short_config
from flax import nnx

from jaxattn.nn import Classifier, EncoderDecoder, TinyDecoder
from jaxattn.train import tasks
from jaxattn.train.checkpoints import model_spec
from jaxattn.train.config import load_config
from jaxattn.train.load import load_run
from jaxattn.train.loop import train
from jaxattn.train.steps import make_eval_fn

# copy_seq2seq's batches are checked below; its encoder-decoder trains here on translate.
KINDS = {
    "prefix_lm": ("model.kind=prefix_lm",),
    "translate": (
        "model.kind=encoder_decoder",
        "task.name=translate",
        "task.length=9",
        "task.vocab_size=47",
    ),
    "classify": ("model.kind=classifier", "task.name=classify", "task.length=12"),
}
MODELS = {
    "prefix_lm": TinyDecoder,
    "translate": EncoderDecoder,
    "classify": Classifier,
}


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_trains_evaluates_and_loads_back(tmp_path, name):
    lines = []
    config = short_config(tmp_path / "run", *KINDS[name], "train.pictures=true")
    result = train(config, log=lines.append)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("eval_loss", "eval_token_accuracy", "exact_match"):
        assert 0.0 <= record[key] < float("inf")
    assert record["step"] == 20
    model, loaded = load_run(result.run_dir)
    assert type(model) is MODELS[name] and loaded == config
    # The loaded model's held-out exact-match is the one the run recorded at its best step.
    graphdef, params = nnx.split(model, nnx.Param)
    again = jax.device_get(make_eval_fn(config, graphdef)(params))
    best = max(
        (json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()),
        key=lambda r: (r["exact_match"], -r["eval_loss"]),
    )
    assert float(again["exact_match"]) == pytest.approx(best["exact_match"])
    # The curves are drawn for every kind; the attention picture for the decoders only.
    drawn = {p.name for p in result.run_dir.iterdir() if p.suffix == ".png"}
    assert drawn == ({"attention.png", "curves.png"} if name == "prefix_lm" else {"curves.png"})
    assert any(line.startswith("pictures: ") for line in lines)


def test_batches_of_each_kind():
    """What each kind's batch holds (tasks.make_batch): shapes, padding and what is scored."""
    key, b = jax.random.key(0), 6
    make_batch = jax.jit(tasks.make_batch, static_argnums=(0, 2, 3))
    seq2seq = load_config(ROOT / "configs" / "copy_seq2seq.yaml")
    batch = make_batch(seq2seq.task, key, b, "encoder_decoder")
    seq = jax.jit(tasks.make_sequences, static_argnums=(0, 2))(seq2seq.task, key, b)
    length = seq2seq.task.length
    np.testing.assert_array_equal(batch.source, seq[:, 1 : length + 1])  # x
    np.testing.assert_array_equal(batch.inputs[:, 0], tasks.BOS)  # BOS y
    np.testing.assert_array_equal(batch.inputs[:, 1:], seq[:, length + 2 :])
    np.testing.assert_array_equal(batch.targets[:, :-1], seq[:, length + 2 :])  # y SEP
    np.testing.assert_array_equal(batch.targets[:, -1], tasks.SEP)
    assert float(batch.loss_mask.min()) == 1.0
    translate = load_config(ROOT / "configs" / "translate.yaml")
    batch = make_batch(translate.task, key, b, "encoder_decoder")
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # shifted
    np.testing.assert_array_equal(batch.loss_mask, batch.targets != tasks.PAD)
    classify = load_config(ROOT / "configs" / "classify.yaml")
    batch = make_batch(classify.task, key, b, "classifier")
    assert batch.inputs.shape == (b, 16) and batch.targets.shape == batch.loss_mask.shape == (b, 1)
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    prefix = make_batch(tiny.task, key, b, "prefix_lm")
    plain = make_batch(tiny.task, key, b, "decoder")
    np.testing.assert_array_equal(prefix.inputs, plain.inputs)
    np.testing.assert_array_equal(prefix.prefix_lengths, tasks.prompt_length(tiny.task))


def test_a_decoders_model_spec_is_what_it_was_so_old_checkpoints_load():
    """model.kind joined the model keys later: a decoder's spec (which a checkpoint's
    fingerprint covers) leaves it out, as runs saved before it were."""
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert "model.kind" not in model_spec(tiny) and "task.num_classes" not in model_spec(tiny)
    classify = model_spec(load_config(ROOT / "configs" / "classify.yaml"))
    assert classify["model.kind"] == "classifier" and classify["task.num_classes"] == 3


@pytest.mark.processes
def test_generate_refuses_a_run_of_another_kind_in_one_line(tmp_path):
    config = short_config(tmp_path / "run", *KINDS["classify"], "train.steps=10")
    train(config, log=lambda _: None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxattn.commands.generate",
            "--run",
            str(tmp_path / "run"),
            "--prompt",
            "3 4 5",
            "--no-compile-cache",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "generate runs a causal decoder, and this run's model.kind is classifier" in lines[0]
