"""Pictures of a run: attention heatmaps of the trained decoder and training curves. Needs
matplotlib (``pip install jaxattn[viz]``); it is imported only when a picture is drawn. The
trainer draws them at the end of a run; ``python -m jaxattn.commands.viz`` draws them again."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np

from jaxattn.train import _preload
from jaxattn.train.rundir import RunDir, RunError, describe_os_error


def _figure(width: float, height: float):
    """A matplotlib figure of that size in inches, drawn off-screen (Agg). Figures are made
    directly, not through pyplot: nothing global to close, and any thread may draw one."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pictures need matplotlib: pip install 'jaxattn[viz]' (or matplotlib)"
        ) from err
    return Figure(figsize=(width, height))


def preload() -> None:
    """Import matplotlib in the background (half a second, most of it Python): a run calls
    this as it starts training, so the import overlaps the steps (:mod:`jaxattn.train._preload`).
    """
    _preload.preload("matplotlib.figure", "matplotlib.backends.backend_agg")


def token_labels(tokens) -> list[str]:
    from jaxattn.train.tasks import token_label

    return [token_label(t) for t in np.asarray(tokens)]


def plot_attention(weights, tokens, path, *, title: str | None = None) -> Path:
    """A grid of heatmaps, one per (layer, head), of one sequence's attention.

    Args:
      weights: ``[L, N, T, T]`` (layers, heads, queries, keys), rows summing to 1 or 0.
      tokens: int ``[T]``, the sequence the model read (axis labels).
      path: where to write the PNG.
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must be [layers, heads, T, T], got shape {weights.shape}")
    layers, heads, t, _ = weights.shape
    labels = token_labels(tokens)
    if len(labels) != t:
        raise ValueError(f"tokens has length {len(labels)} but the weights cover {t} positions")
    # Inches per panel: about 8 pt per token, at most 4 in (long sequences label every
    # k-th token instead, so a picture of T = 400 is not 19k pixels wide). The layout is
    # fixed in inches (margins for the labels, gaps for the titles) rather than solved by
    # matplotlib's layout engines, and only the left column (queries) and the bottom row
    # (keys) have ticks: both cost most of the drawing time (1 s of 1.4 s at T = 21).
    side = min(max(1.6, 0.11 * t), 4.0)
    every = max(1, math.ceil(t / 36))
    ticks = list(range(0, t, every))
    left, right, top, bottom, gap = 0.5, 0.9, 0.5, 0.42, 0.22
    width = left + heads * side + (heads - 1) * gap + right
    height = top + layers * side + (layers - 1) * gap + bottom
    fig = _figure(width, height)
    for layer in range(layers):
        for head in range(heads):
            x = left + head * (side + gap)
            y = height - top - (layer + 1) * side - layer * gap
            ax = fig.add_axes((x / width, y / height, side / width, side / height))
            image = ax.imshow(weights[layer, head], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer} head {head}", fontsize=8, pad=2)
            ax.tick_params(length=1.5, pad=1)
            if layer == layers - 1:
                ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=5, rotation=90)
                ax.set_xlabel("key", fontsize=7, labelpad=1)
            else:
                ax.set_xticks([])
            if head == 0:
                ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=5)
                ax.set_ylabel("query", fontsize=7, labelpad=1)
            else:
                ax.set_yticks([])
    panels = height - top - bottom  # the colour bar spans the panels, right of them
    bar = fig.add_axes(
        ((width - right + 0.12) / width, bottom / height, 0.12 / width, panels / height)
    )
    fig.colorbar(image, cax=bar, label="attention weight")
    fig.suptitle(
        title or "attention weights (rows: queries, columns: keys)",
        fontsize=10,
        y=1 - 0.12 / height,
        va="top",
    )
    return _save(fig, path)


# (graphdef, task) -> attention_of's program, by compile_attention_of: the latest run's only
# (a process that trains many models keeps one compiled program, not one per model).
_COMPILED: dict = {}


def _weights_program(graphdef, task, kind="decoder"):
    """``(state, example) -> (tokens, weights)`` of :func:`attention_of`, to be jitted."""
    from flax import nnx

    from jaxattn.train import tasks

    def weights(state, example):
        batch = tasks.eval_batch(task, kind)
        tokens = batch.inputs[example]
        prefix = None if batch.prefix_lengths is None else batch.prefix_lengths[example, None]
        model = nnx.merge(graphdef, state)
        _, w = model(tokens[None], prefix_lengths=prefix, return_attention=True)
        return tokens, w[:, 0]  # [L, 1, N, T, T] -> [L, N, T, T]

    return weights


def compile_attention_of(graphdef, params, task, kind="decoder") -> None:
    """Compile :func:`attention_of`'s program ahead of time for a model of ``graphdef`` with
    ``params`` (shapes only: ``jax.ShapeDtypeStruct``), which it then uses (the trainer
    compiles it in the background while the steps run)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(nnx.merge(graphdef, params))
    program = jax.jit(_weights_program(graphdef, task, kind)).lower(state, 0).compile()
    _COMPILED.clear()
    _COMPILED[graphdef, task, kind] = program


def attention_of(model, task, example: int, kind: str = "decoder"):
    """``(tokens [T], weights [L, N, T, T])`` as NumPy: held-out sequence ``example`` of
    ``task`` (:func:`jaxattn.train.tasks.eval_batch`) and the attention weights ``model``
    gives it, in one compiled program (run eagerly, each of the model's operations compiles
    on its own: 2.7 s of a default run's 4.7 s of pictures)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    compiled = _COMPILED.get((graphdef, task, kind))
    if compiled is not None:
        try:
            return jax.device_get(compiled(state, example))
        except (TypeError, ValueError):  # other shardings or shapes than compiled for
            pass
    return jax.device_get(jax.jit(_weights_program(graphdef, task, kind))(state, example))


_CURVE_KEYS = ("step", "train_loss", "eval_loss", "eval_token_accuracy", "exact_match")


def read_metrics(metrics_jsonl) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, checked: each line a JSON object with a
    numeric (or null) value for every key the curves need.

    Raises RunError (one line naming the file, the line and the key).
    """
    path = Path(metrics_jsonl)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise RunError(f"cannot read {path}: {describe_os_error(err)}") from None
    except UnicodeDecodeError:
        raise RunError(f"{path} is not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}, line {number}: not a JSON object")
        for key in _CURVE_KEYS:
            if key not in record:
                raise RunError(f"{path}, line {number}: no key {key!r}")
            value = record[key]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise RunError(f"{path}, line {number}: {key} is {value!r}, not a number")
        records.append(record)
    if not records:
        raise RunError(f"{path} holds no evaluation records")
    return records


def _per_step(records, key: str, fallback: str):
    """(steps, values) of every training step from the records' ``key`` lists (written
    since per-step curves exist), or one point per record from ``fallback``."""
    steps, values, previous = [], [], 0
    for r in records:
        listed = r.get(key)
        if not isinstance(listed, list) or not listed:
            steps.append(r["step"])
            values.append(np.nan if r.get(fallback) is None else r[fallback])
        else:
            first = r["step"] - len(listed) + 1
            steps.extend(range(max(first, previous + 1), r["step"] + 1)[-len(listed) :])
            values.extend(np.nan if v is None else v for v in listed)
        previous = r["step"]
    return np.asarray(steps[: len(values)]), np.asarray(values, np.float64)


def plot_training_curves(records, path, *, label_smoothing: float = 0.0) -> Path:
    """Three panels against step, from :func:`read_metrics` records (or the path of a run's
    ``metrics.jsonl``): the training loss of every step and the held-out loss; held-out
    token accuracy and exact-match; the learning rate. ``label_smoothing``: the run's
    ``optim.label_smoothing``, which the training loss includes and the held-out one not."""
    if not isinstance(records, list):
        records = read_metrics(records)

    def series(key):  # null (no finite value) is drawn as a gap
        return [np.nan if r.get(key) is None else r[key] for r in records]

    steps = series("step")
    fig = _figure(12, 3.4)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    loss_steps, losses = _per_step(records, "step_losses", "train_loss")
    # A label-smoothed training loss has a floor above 0; the held-out loss is never smoothed.
    train_label = "train, every step"
    if label_smoothing:
        train_label += f" (label smoothing {label_smoothing:g})"
    ax_loss.plot(loss_steps, losses, lw=0.8, alpha=0.8, label=train_label)
    ax_loss.plot(steps, series("eval_loss"), marker="o", ms=3, label="held-out")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(loc="upper right", fontsize=8)  # the curves fall from the upper left
    ax_acc.plot(steps, series("eval_token_accuracy"), marker="o", ms=3, label="token accuracy")
    ax_acc.plot(steps, series("exact_match"), marker="o", ms=3, label="exact match")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_title("held-out", fontsize=10)
    ax_acc.legend(loc="lower right", fontsize=8)
    lr_steps, lrs = _per_step(records, "step_lrs", "lr")
    ax_lr.plot(lr_steps, lrs)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    # Fixed margins (inches: 0.65 left, 0.5 bottom) instead of tight_layout, which measured
    # every label first: 40% of this picture's time.
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.15, top=0.92, wspace=0.26)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Save a figure whole or not at all: a temporary PNG beside ``path``, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C too: no half-written temporary is left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise RunError.writing(path, err) from None
        raise
    return path


def _refuse_a_file_in_the_way(path: Path) -> None:
    """RunError when ``path``, or a folder it would be created in, is a file (mkdir says
    only "File exists" or "Not a directory")."""
    in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way == path:
        raise RunError(f"{path} is a file, not a directory")
    if in_the_way is not None:
        raise RunError(f"cannot create {path}: {in_the_way} is a file, not a directory")


def draw_run(run_dir, *, example: int = 0, out_dir=None, step="best") -> list[Path]:
    """Write ``attention.png`` (every layer and head on one held-out sequence) and
    ``curves.png`` (losses, held-out accuracy and exact-match, learning rate against step)
    of a run.

    Args:
      run_dir: a run directory written by train.py, finished or not.
      example: which held-out sequence to show.
      out_dir: where the pictures go (default: the run directory).
      step: the checkpoint to draw: ``"best"``, ``"latest"`` or a step number.

    Everything is read and checked before the first picture is written. Raises RunError
    (one line) for an unusable run or an unwritable ``out_dir``, ValueError for ``example``.
    """
    from jaxattn.nn.config import DECODER_KINDS
    from jaxattn.train.load import load_run

    run = RunDir(Path(run_dir).expanduser())
    out = RunDir(run.path if out_dir is None else Path(out_dir).expanduser())
    _refuse_a_file_in_the_way(out.path)  # before the run is read: seconds
    model, config = load_run(run.path, step=step)
    records = read_metrics(run.metrics)
    if not 0 <= example < config.task.eval_size:
        raise ValueError(f"example must be in [0, {config.task.eval_size}), got {example}")
    try:
        out.path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create {out.path}: {describe_os_error(err)}") from None
    for path in out.pictures:  # both writable before either is drawn
        if path.is_dir():
            raise RunError(f"cannot write {path}: it is a directory")
    attention, curves = out.pictures
    drawn = []
    if config.model.kind in DECODER_KINDS:  # an encoder's pictures are not drawn yet
        tokens, weights = attention_of(model, config.task, example, config.model.kind)
        title = f"{config.name}: {config.task.name}, held-out sequence {example}"
        drawn.append(plot_attention(weights, tokens, attention, title=title))
    curves = plot_training_curves(records, curves, label_smoothing=config.optim.label_smoothing)
    return [*drawn, curves]
