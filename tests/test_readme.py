"""The README as a user meets it: every shell command it shows (a fenced block's ``$ `` lines)
and the example of each command's ``--help`` run as shown, after the README's first command
as a user runs them, and print what the README shows under them; its Python blocks run; its
list of the keys a resume may change is the code's.

The blocks are read from README.md, so a new one is run without a change here; a fenced
block that is neither Python nor ``$`` commands must be named in ``NOT_RUN`` with the reason.
Commands run in a scratch working directory that holds what a user's checkout holds after
the README's first command: ``configs/``, ``examples/`` and ``runs/tiny``, a copy of the
suite's trained run (``trained_tiny``, never written to). The first command itself is that
fixture's run; the others run in this process (``main(argv)`` of each command), which saves
starting Python and importing JAX each time.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import tokenize
from dataclasses import dataclass, field

import pytest
from conftest import ROOT

README = ROOT / "README.md"

# Fenced blocks that are neither Python nor "$ " commands, by the start of their first line:
# why each is not run here. A block that is not named fails test_every_block_is_run_or_named.
NOT_RUN = {
    "make train": "installs into .venv (minutes); `make test` is what CI runs, and the training "
    "it starts is the README's first command, checked below",
    "train.py: stopped by SIGTERM": "the line of a stopped run, not a command: "
    "tests/train/test_loop.py signals a run and checks it",
    "# host 0 (10.0.0.1)": "needs two hosts; tests/train/test_distributed.py runs two processes "
    "on one host",
    "train.py                  the train command": "the repository's layout, not a command",
}

# Python blocks that are fragments of the text around them: code run before each (by the
# start of its first line), and why.
PYTHON_GIVEN = {
    "out = jax.nn.dot_product_attention(": (
        "import jax\nimport jaxattn\nbias = mask = None",
        "before and after of one call: bias and mask stand for the caller's (None is valid); "
        "q, k, v are the blocks' above",
    ),
    "out = dot_product_attention(q, k, v, is_causal=True, dropout_rate=0.1": (
        "import jax\nkey = jax.random.key(0)",
        "key stands for the caller's PRNG key",
    ),
}
# Python blocks run with a change, and why.
PYTHON_CHANGED = {
    "q = k = v = jnp.ones((1, 16384, 8, 64))": (
        (("16384", "512"), ("16000", "500")),
        "the same calls at T = 512 (still the flash path): at T = 16384 this block takes 15 s "
        "of CPU time on two cores, and the dropout block after it uses the same q, k, v; "
        "tests/test_flash.py checks the flash path at long T",
    ),
}

# What legitimately differs from run to run in what a command prints: wall times and rates.
VARYING = (
    (re.compile(r"\b\d+\.\d s\b"), "<seconds> s"),  # "after 200 steps, 13.3 s"
    (re.compile(r"\[[0-9:]+<[0-9:?]+, +[0-9.?]+(step/s|s/step)"), "[<elapsed><<left>, <rate>"),
    (re.compile(r"steps/s=\d+"), "steps/s=<rate>"),
)
# The progress bar's final state (tqdm, on stderr), e.g.
# " 13%|█▎        | 200/1500 [00:06<00:41, 31.11step/s, loss=0.569, acc=1.000, lr=2.96e-03,
# steps/s=46, exact=1.000]".
BAR = re.compile(
    r" *(?P<percent>\d+)%\|[^|]*\| (?P<step>\d+)/(?P<total>\d+) \[[^,]*, [^,]*, "
    r"loss=(?P<loss>[0-9.]+), acc=[0-9.]+, lr=(?P<lr>[0-9.e+-]+), steps/s=\d+, "
    r"exact=(?P<exact>[0-9.]+)\]"
)
TINY = ("python", "train.py", "--config", "configs/tiny.yaml")  # the fixture trained_tiny's
COMMANDS = {
    ("python", "train.py"): "jaxattn.commands.train",
    ("python", "-m", "jaxattn.commands.generate"): "jaxattn.commands.generate",
    ("python", "-m", "jaxattn.commands.viz"): "jaxattn.commands.viz",
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence in README.md, from 1
    language: str
    lines: tuple[str, ...]


def fenced_blocks(text: str) -> list[Block]:
    """The README's ``` blocks, indented ones (inside a list item) dedented."""
    blocks, opened, body = [], None, []
    for number, raw in enumerate(text.splitlines(), 1):
        indent = len(raw) - len(raw.lstrip())
        if not raw.lstrip().startswith("```"):
            if opened is not None:
                body.append(raw[opened[2] :])
        elif opened is None:
            opened, body = (number, raw.strip()[3:], indent), []
        else:
            blocks.append(Block(opened[0], opened[1], tuple(body)))
            opened = None
    assert opened is None, f"README.md:{opened[0]}: a block is never closed"
    return blocks


@dataclass
class Command:
    argv: tuple[str, ...]
    text: str  # as shown
    expected: list[str] | None  # the lines the README shows under it; None: shown nowhere
    where: list[str] = field(default_factory=list)


def help_text(module: str) -> str:
    """``--help`` of a command as an 80-column terminal shows it."""
    out, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            importlib.import_module(module).main(["--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue()


def help_examples(text: str) -> list[list[str]]:
    """The ``example:`` commands of a help text, each as the lines it is printed on."""
    examples, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("example: "):
            example = [line.removeprefix("example: ")]
            for more in lines[i + 1 :]:
                if not more.strip() or more.startswith("example: "):
                    break
                example.append(more)
            examples.append(example)
    return examples


def collect_commands() -> list[Command]:
    """The README's commands in order, then the --help examples it does not show already."""
    commands: dict[tuple[str, ...], Command] = {}
    for block in BLOCKS:
        current = None
        for offset, line in enumerate(block.lines, 1):
            if line.startswith("$ "):
                argv = tuple(shlex.split(line[2:], comments=True))
                current = commands.setdefault(argv, Command(argv, line[2:], []))
                current.where.append(f"README.md:{block.line + offset}")
                current.expected = []  # a command shown twice must print the later lines
            elif current is not None:
                current.expected.append(line)
    for module, lines in HELP_EXAMPLES:
        text = " ".join(" ".join(lines).split())
        argv = tuple(shlex.split(text))
        command = commands.setdefault(argv, Command(argv, text, None))
        command.where.append(f"{module} --help")
    return list(commands.values())


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
HELP_EXAMPLES = [
    (module, lines) for module in COMMANDS.values() for lines in help_examples(help_text(module))
]
ALL_COMMANDS = collect_commands()


def normalized(lines) -> list[str]:
    out = []
    for line in lines:
        for pattern, replacement in VARYING:
            line = pattern.sub(replacement, line)
        out.append(line.rstrip())
    return out


def shown(stream: str) -> list[str]:
    """The lines a terminal keeps: of each line rewritten with carriage returns (the progress
    bar), its final state."""
    lines = (line.rsplit("\r", 1)[-1] for line in stream.split("\n"))  # not splitlines: \r
    return [line for line in lines if line]


@pytest.fixture
def workspace(trained_tiny, tmp_path, monkeypatch):
    """A working directory as the README's user has it after its first command."""
    run_dir, _ = trained_tiny
    work = tmp_path / "checkout"
    for name in ("configs", "examples"):
        shutil.copytree(ROOT / name, work / name)
    shutil.copytree(run_dir, work / "runs" / "tiny")
    monkeypatch.chdir(work)
    return work


def check_the_first_run(command: Command, trained_tiny) -> None:
    """The README's first command is the run of the fixture trained_tiny: what it printed on
    stdout (its run directory shown as runs/tiny), and the progress bar's numbers against the
    run's metrics (the fixture turns the bar off; test_the_readme_commands checks the bar
    itself on the rotary run, which prints it)."""
    from jaxattn.train.config import load_config

    run_dir, printed = trained_tiny
    bars = [line for line in command.expected if BAR.fullmatch(line)]
    assert len(bars) == 1, f"{command.where}: one progress bar line expected"
    stdout = [line.replace(str(run_dir), "runs/tiny") for line in printed]
    wanted = [line for line in command.expected if line not in bars]
    assert normalized(stdout) == normalized(wanted), command.where

    bar = BAR.fullmatch(bars[0])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    steps = load_config(ROOT / TINY[3]).train.steps
    assert (int(bar["step"]), int(bar["total"])) == (last["step"], steps)
    assert bar["percent"] == f"{100 * last['step'] / steps:.0f}"  # tqdm rounds
    assert bar["loss"] == f"{last['step_losses'][-1]:.3f}"
    assert bar["lr"] == f"{last['lr']:.2e}"
    assert bar["exact"] == f"{last['exact_match']:.3f}"


@pytest.mark.processes
@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c.argv[1:])[:60])
def test_the_readme_commands(command, workspace, trained_tiny, capsys):
    """Each command prints the lines the README shows under it (the bar's final state and
    other stderr first, as a terminal shows them), times and rates aside; a command that
    prints only on stderr is a refusal: one line, exit status 2. A --help example the README
    does not show must succeed."""
    if command.argv == TINY:
        check_the_first_run(command, trained_tiny)
        return
    prefix = next((p for p in COMMANDS if command.argv[: len(p)] == p), None)
    assert prefix is not None, (
        f"{command.where}: {command.text!r} is not a command this test runs; run it here, "
        "or name its block in NOT_RUN with the reason"
    )
    main = importlib.import_module(COMMANDS[prefix]).main
    try:
        status = main(list(command.argv[len(prefix) :]))
    except SystemExit as stop:  # argparse
        status = stop.code
    captured = capsys.readouterr()
    err, out = shown(captured.err), shown(captured.out)
    assert "Traceback" not in captured.err, captured.err[-3000:]
    if out or command.expected is None:
        assert status == 0, (command.where, captured.err[-3000:])
    else:
        assert (status, len(err)) == (2, 1), (command.where, status, captured.err[-3000:])
    if command.expected is not None:
        assert normalized(err + out) == normalized(command.expected), command.where


def test_every_block_is_run_or_named():
    named = {prefix: 0 for prefix in NOT_RUN}
    for block in BLOCKS:
        first = block.lines[0] if block.lines else ""
        if block.language == "python":
            continue
        if first.startswith("$ "):
            continue
        prefix = next((p for p in NOT_RUN if first.startswith(p)), None)
        assert prefix is not None, (
            f"README.md:{block.line}: a block that is neither Python nor $ commands; "
            "write its commands as $ lines, or name it in NOT_RUN with the reason"
        )
        named[prefix] += 1
    assert all(named.values()), f"NOT_RUN names blocks the README no longer has: {named}"
    for prefix in (*PYTHON_GIVEN, *PYTHON_CHANGED):  # no stale entries either
        assert any(b.lines and b.lines[0].startswith(prefix) for b in BLOCKS), prefix


@pytest.mark.parametrize(("module", "lines"), HELP_EXAMPLES, ids=[m for m, _ in HELP_EXAMPLES])
def test_each_help_example_pastes_as_one_command(module, lines):
    """At 80 columns argparse wraps the epilog: a line break outside quotes would run half of
    the example when pasted (test_the_readme_commands runs each example)."""
    for end in range(1, len(lines)):
        with pytest.raises(ValueError, match="No closing quotation"):
            shlex.split("\n".join(lines[:end]))  # the break falls inside quotes


SHAPE_CLAIM = re.compile(r"#\s*(?:(?P<dtype>[a-z]+[0-9]*)\s+)?\[(?P<dims>[A-Za-z0-9_, ]+)\]")


def run_python_block(block: Block, namespace: dict) -> None:
    """Run a block statement by statement, as README.md's lines; a statement ``x = ...``
    whose comment starts with a shape (``# [B, T, N, H]``, ``# int32 [2, 9]``) must make
    ``x`` of that shape and dtype (of ``out, weights = ...``, the last name: weights)."""
    first = block.lines[0]
    source = "\n".join(block.lines) + "\n"
    for prefix, (old_new, _) in PYTHON_CHANGED.items():
        if first.startswith(prefix):
            for old, new in old_new:
                assert old in source, (f"README.md:{block.line}", old)  # no stale change
                source = source.replace(old, new)
    for prefix, (given, _) in PYTHON_GIVEN.items():
        if first.startswith(prefix):
            exec(given, namespace)
    comments = {
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    for statement in ast.parse(source).body:
        claim = SHAPE_CLAIM.match(comments.get(statement.end_lineno, ""))
        where = f"README.md:{block.line + statement.lineno}"
        module = ast.Module([statement], type_ignores=[])
        ast.increment_lineno(module, block.line)  # tracebacks name README.md's lines
        exec(compile(module, str(README), "exec"), namespace)
        targets = getattr(statement, "targets", [None])
        target = targets[0].elts[-1] if isinstance(targets[0], ast.Tuple) else targets[0]
        if claim and len(targets) == 1 and isinstance(target, ast.Name):
            value = namespace[target.id]
            dims = [d.strip() for d in claim["dims"].split(",")]
            shape = tuple(int(d) if d.isdigit() else namespace[d] for d in dims)
            assert value.shape == shape, (where, value.shape)
            if claim["dtype"]:
                assert str(value.dtype) == claim["dtype"], (where, value.dtype)


@pytest.mark.processes
def test_the_readme_python_blocks_run(workspace):
    """In README order and one namespace, as a user pasting them into one session; load_run
    reads runs/tiny, the copy of the trained run."""
    namespace: dict = {"__name__": "readme"}
    blocks = [b for b in BLOCKS if b.language == "python"]
    assert blocks
    for block in blocks:
        run_python_block(block, namespace)


def test_the_readme_lists_the_keys_a_resume_may_change():
    from jaxattn.train.session import RESUMABLE_DIFFERENCES

    text = " ".join(README.read_text(encoding="utf-8").split())
    rule = r"A resume with a different config is refused, naming the key; only (.*?) may change"
    rules = re.findall(rule, text)
    assert len(rules) == 1, "the README's resume rule moved: update this test's pattern"
    listed = re.findall(r"`([a-z_]+\.[a-z_]+)`", rules[0])
    assert sorted(listed) == sorted(RESUMABLE_DIFFERENCES)
