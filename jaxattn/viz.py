"""Pictures: attention heatmaps of a decoder and training curves. Needs matplotlib
(``pip install jaxattn[viz]``); it is imported only when a picture is drawn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pictures need matplotlib: pip install 'jaxattn[viz]' (or matplotlib)"
        ) from err
    return plt


def token_labels(tokens) -> list[str]:
    from jaxattn.tasks import BOS, PAD, SEP

    special = {PAD: "PAD", BOS: "BOS", SEP: "SEP"}
    return [special.get(int(t), str(int(t))) for t in np.asarray(tokens)]


def plot_attention(weights, tokens, path, *, title: str | None = None) -> Path:
    """A grid of heatmaps, one per (layer, head), of one sequence's attention.

    Args:
      weights: ``[L, N, T, T]`` (layers, heads, queries, keys), rows summing to 1 or 0.
      tokens: int ``[T]``, the sequence the model read (axis labels).
      path: where to write the PNG.
    """
    plt = _pyplot()
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must be [layers, heads, T, T], got shape {weights.shape}")
    layers, heads, t, _ = weights.shape
    labels = token_labels(tokens)
    if len(labels) != t:
        raise ValueError(f"tokens has length {len(labels)} but the weights cover {t} positions")
    fig, axes = plt.subplots(
        layers, heads, figsize=(2.6 * heads + 1, 2.6 * layers + 0.6), squeeze=False
    )
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer, head], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(t), labels, fontsize=5, rotation=90)
            ax.set_yticks(range(t), labels, fontsize=5)
            if head == 0:
                ax.set_ylabel("query", fontsize=7)
            if layer == layers - 1:
                ax.set_xlabel("key", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title or "attention weights (rows: queries, columns: keys)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(metrics_jsonl, path) -> Path:
    """Loss and held-out exact-match against step, from a run's ``metrics.jsonl``."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no evaluation records")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(steps, [r["train_loss"] for r in records], label="train")
    ax_loss.plot(steps, [r["eval_loss"] for r in records], label="held-out")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(steps, [r["eval_token_accuracy"] for r in records], label="token accuracy")
    ax_acc.plot(steps, [r["exact_match"] for r in records], label="exact match")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_run(run_dir, *, example: int = 0) -> list[Path]:
    """Write ``attention.png`` (every layer and head on one held-out sequence) and
    ``curves.png`` (loss and exact-match against step) into a finished run directory."""
    from jaxattn import tasks
    from jaxattn.training import load_run

    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    batch = tasks.eval_batch(config.task)
    if not 0 <= example < batch.inputs.shape[0]:
        raise ValueError(f"example must be in [0, {batch.inputs.shape[0]}), got {example}")
    tokens = batch.inputs[example : example + 1]
    _, weights = model(tokens, return_attention=True)  # [L, 1, N, T, T]
    title = f"{config.name}: {config.task.name}, held-out sequence {example}"
    paths = [plot_attention(weights[:, 0], tokens[0], run_dir / "attention.png", title=title)]
    paths.append(plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png"))
    return paths


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m jaxattn.viz",
        description="Draw attention heatmaps and training curves of a finished run.",
    )
    parser.add_argument("run_dir", help="a run directory written by train.py, e.g. runs/tiny")
    parser.add_argument("--example", type=int, default=0, help="held-out sequence to show")
    args = parser.parse_args(argv)
    try:
        paths = draw_run(args.run_dir, example=args.example)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"jaxattn.viz: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
