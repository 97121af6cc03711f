"""Answer prompts with a trained run: ``python -m jaxattn.commands.generate --run runs/tiny
--prompt "3 4 5 6 7 8 9 10 11 12"``.

The prompt is the task's symbols (ids ``3 .. vocab_size - 1``); the command wraps them in the
task's format (``BOS x1 .. xL SEP``), generates with the key/value cache
(:func:`jaxattn.nn.generate`) and prints the answer, one line per prompt. ``--prompts-file``
reads one prompt per line (blank lines and ``#`` comments skipped); prompts of different
lengths are decoded in one batch. Every failure is one line on stderr and exit status 2
(130 on Ctrl-C; 1 or 141 when the answers cannot be written, as
:func:`~jaxattn.commands._ending.run_command` says).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from jaxattn.commands._compile_cache import add_compile_cache_flag, use_compile_cache
from jaxattn.commands._ending import (
    OneLineParser,
    exit_with,
    run_command,
    run_errors,
    step_argument,
)

__all__ = ["main", "parse_prompt", "read_prompts"]


class PromptError(ValueError):
    """A prompt the model cannot take; the message is one line naming it."""


def parse_prompt(text: str, vocab_size: int, where: str = "prompt") -> list[int]:
    """The symbols of one prompt line: whitespace-separated ids in ``[3, vocab_size)``."""
    from jaxattn.train.tasks import FIRST_SYMBOL, token_label

    symbols = []
    for word in text.split():
        if not re.fullmatch(r"-?[0-9]+", word):  # int() would take "٣" and "3_0" too
            raise PromptError(f"{where}: {word!r} is not a token id (an integer)")
        token = int(word)
        if not FIRST_SYMBOL <= token < vocab_size:
            what = (
                f"is {token_label(token)}, which the command adds itself"
                if 0 <= token < FIRST_SYMBOL
                else "is outside the vocabulary"
            )
            raise PromptError(
                f"{where}: token {token} {what}; symbols are {FIRST_SYMBOL}..{vocab_size - 1}"
            )
        symbols.append(token)
    if not symbols:
        raise PromptError(f"{where} is empty")
    return symbols


def read_prompts(path, vocab_size: int) -> list[list[int]]:
    """The prompts of a file, one per line; blank lines and ``#`` comments skipped."""
    from jaxattn.train.rundir import describe_os_error

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not a token
    except OSError as err:
        raise PromptError(f"cannot read {path}: {describe_os_error(err)}") from None
    except UnicodeDecodeError:
        raise PromptError(f"{path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        if line.strip():
            prompts.append(parse_prompt(line, vocab_size, f"{path}, line {number}"))
    if not prompts:
        raise PromptError(f"{path} holds no prompt")
    return prompts


BATCH = 1024  # prompts generated together


def _answer(args) -> list[str]:
    import jax

    from jaxattn.nn.decoding import generate
    from jaxattn.train import tasks
    from jaxattn.train.load import load_run
    from jaxattn.train.rundir import RunError

    model, config = load_run(args.run, step=args.step)
    if config.model.kind != "decoder":  # a prefix-LM's prompt must be prefilled both ways
        raise RunError(
            f"{args.run}: generate runs a causal decoder, and this run's model.kind is "
            f"{config.model.kind} (its generation is not written yet)"
        )
    vocab = config.task.vocab_size
    if args.prompts_file is not None:
        prompts = read_prompts(args.prompts_file, vocab)
    else:
        prompts = [parse_prompt(args.prompt, vocab)]
    # Every task's answer has as many tokens as the prompt has symbols.
    wanted = [len(p) if args.max_new_tokens is None else args.max_new_tokens for p in prompts]
    need = max(len(p) + 2 + n for p, n in zip(prompts, wanted, strict=True))
    if need > config.model.max_len:
        p, n = max(zip(prompts, wanted, strict=True), key=lambda pn: len(pn[0]) + pn[1])
        raise PromptError(
            f"a prompt of {len(p)} symbols needs {len(p)} + 2 (BOS, SEP) + {n} new tokens "
            f"= {need} positions, but the model's max_len is {config.model.max_len}"
        )
    stop = args.stop_token
    if stop is not None and not 0 <= stop < vocab:
        raise PromptError(f"--stop-token {stop} is outside the vocabulary [0, {vocab})")
    framed = [[tasks.BOS, *p, tasks.SEP] for p in prompts]
    trained = config.task.length
    if any(len(p) != trained for p in prompts):
        print(
            "jaxattn.commands.generate: note: the model was trained on prompts of "
            f"{trained} symbols",
            file=sys.stderr,
        )
    rows = []
    for start in range(0, len(framed), BATCH):  # memory bounded by BATCH, not the file
        out = generate(
            model,
            framed[start : start + BATCH],
            max(wanted),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_token=stop,
            key=jax.random.fold_in(jax.random.key(args.seed), start),
        )
        rows.extend(out.tolist())
    lines = []
    for row, prompt, n in zip(rows, framed, wanted, strict=True):
        answer = row[len(prompt) : len(prompt) + n]
        if stop is not None and stop in answer:
            answer = answer[: answer.index(stop) + 1]
        lines.append(" ".join(tasks.token_label(t) for t in answer))
    return lines


def _int_in(low: int, high: int):
    import argparse

    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) < high:
            raise argparse.ArgumentTypeError(f"must be an int in [{low}, {high}), got {text!r}")
        return int(text)

    return parse


_nonnegative_int = _int_in(0, 2**31)
_positive_int = _int_in(1, 2**31)


def _float_in(low: float, high: float, *, low_open: bool = False):
    import argparse

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (low < x <= high if low_open else low <= x <= high):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {text!r}")
        return x

    return parse


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m jaxattn.commands.generate",
        description="Answer prompts with a trained run (greedy unless --temperature > 0).",
        epilog=(
            "example: python -m jaxattn.commands.generate --run runs/tiny "
            '--prompt "3 4 5 6 7 8 9 10 11 12"'
        ),
    )
    parser.add_argument("--run", required=True, help="a run directory written by train.py")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help='the symbols, e.g. "3 4 5" (BOS and SEP are added)')
    given.add_argument("--prompts-file", help="one prompt per line; # starts a comment")
    parser.add_argument(
        "--max-new-tokens",
        type=_nonnegative_int,
        default=None,
        help="tokens to generate (default: as many as the prompt has symbols)",
    )
    parser.add_argument(
        "--temperature", type=_float_in(0.0, math.inf), default=0.0, help="0 = greedy"
    )
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="sample among the k best (with --temperature)",
    )
    parser.add_argument(
        "--top-p", type=_float_in(0.0, 1.0, low_open=True), default=None, help="nucleus mass"
    )
    parser.add_argument("--seed", type=_int_in(0, 2**63), default=0, help="seed of sampling")
    parser.add_argument(
        "--stop-token", type=_nonnegative_int, default=None, help="token id that ends an answer"
    )
    parser.add_argument(
        "--step", default="best", help="checkpoint: best (default), latest or a step number"
    )
    add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    args.step = step_argument(args.step)

    def run() -> None:
        use_compile_cache("jaxattn.commands.generate", not args.no_compile_cache)
        print("\n".join(_answer(args)))

    # The run's errors, and ValueError: a prompt (PromptError) or a flag the model cannot take.
    return run_command("jaxattn.commands.generate", run, known=run_errors(ValueError))


if __name__ == "__main__":
    exit_with(main())
