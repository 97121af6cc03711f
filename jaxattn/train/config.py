"""The run's configuration: the sections assembled into one frozen :class:`Config`, loaded
from YAML and validated.

Each section's dataclass lives beside the code that reads it (``model``:
:mod:`jaxattn.nn.config`, ``task``: :mod:`jaxattn.train.tasks`, ``optim``:
:mod:`jaxattn.train.optim`, ``mesh``: :mod:`jaxattn.train.sharding`); ``train`` (the run
itself: steps, evaluations, checkpoints) is here. Their defaults are the values of
``configs/tiny.yaml``, the default run; the other shipped configs name it as their ``base``
and state only what differs. The loader (``base`` files, dotted command-line overrides; the
YAML dialect is :mod:`jaxattn.train._yaml`) and all validation of config values live below
the dataclasses: the names a string field allows come from the module that implements them
(:data:`jaxattn.train.tasks.TASKS`, :data:`jaxattn.train.optim.SCHEDULES`,
:mod:`jaxattn.nn.config`), and the modules that read a config do not check its values
again. Every field has a comment; ``configs/tiny.yaml`` documents the same fields for users.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jaxattn.nn.config import ACTIVATIONS, COMPUTE_DTYPES, KINDS, NORMS, POSITIONS, ModelConfig
from jaxattn.train import _yaml
from jaxattn.train.distributed import is_host_port
from jaxattn.train.optim import SCHEDULES, OptimConfig
from jaxattn.train.sharding import MeshConfig
from jaxattn.train.tasks import FIRST_SYMBOL, TASKS, TASKS_OF_KIND, TaskConfig, model_length


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # most optimizer steps
    eval_every: int = 50  # steps between held-out evaluations
    target_exact_match: float = 1.0  # stop once held-out exact-match reaches this
    run_dir: str | None = None  # default runs/<config name>
    seed: int = 0  # parameters, dropout and training batches
    steps_per_call: int = 50  # steps fused in one jitted lax.scan
    progress: bool = True  # show a progress bar
    pictures: bool = True  # attention.png and curves.png in the run directory at the end
    checkpoint_every: int | None = None  # steps between checkpoints (None = each eval; 0 = end);
    # a multiple of gcd(steps_per_call, eval_every), so checkpoints fall between fused calls
    keep_checkpoints: int = 3  # latest checkpoints kept (the best by exact-match is kept too)
    on_nonfinite: str = "stop"  # stop | skip: a non-finite loss stops the run or skips the step


@dataclass(frozen=True)
class Config:
    name: str = "tiny"  # run name: default run directory runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


def to_dict(config) -> dict:
    """Plain nested dict of a config (for YAML and JSON)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------
# Loading, overrides and validation

_SECTIONS = {
    "model": ModelConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
}
_TOP_KEYS = ("base", "name", *_SECTIONS)
_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}


class ConfigError(ValueError):
    """A bad config file or override; the message is one user-facing line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """{field: (base type, accepts None)} from the dataclass annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        base = next((a for a in args if a is not type(None)), hints[f.name])
        out[f.name] = (base, type(None) in args)
    return out


# Every dotted key -> (base type, accepts None).
_KEYS: dict[str, tuple[type, bool]] = {"name": (str, False)}
for _section, _cls in _SECTIONS.items():
    _KEYS.update({f"{_section}.{k}": v for k, v in _field_types(_cls).items()})


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_POSITIVE = ((lambda v: v > 0), "> 0")
_UNIT_CLOSED = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_UNIT_OPEN = ((lambda v: 0 <= v < 1), "in [0, 1)")
# PRNG keys are made from 32-bit seeds: 2**32 would silently give seed 0's run.
_MESH_AXIS = ((lambda v: v == -1 or v >= 1), "-1 (all remaining devices) or an int >= 1")
_SEED = ((lambda v: 0 <= v < 2**32), "in [0, 2**32 - 1] (a 32-bit seed)")


# Dotted key -> (predicate, what is allowed); None values of optional keys skip the rule.
_RULES = {
    "name": (
        lambda v: bool(re.fullmatch(r"[\w.-]+", v)) and v not in (".", ".."),
        "a non-empty name of letters, digits, '_', '-' or '.'",
    ),
    "model.kind": _one_of(*KINDS),
    "model.d_model": _at_least(1),
    "model.num_layers": _at_least(1),
    "model.num_heads": _at_least(1),
    "model.num_kv_heads": _at_least(1),
    "model.d_ff": _at_least(1),
    "model.max_len": _at_least(1),
    "model.positions": _one_of(*POSITIONS),
    "model.activation": _one_of(*ACTIVATIONS),
    "model.norm": _one_of(*NORMS),
    "model.dropout": _UNIT_OPEN,
    "model.attention_dropout": _UNIT_OPEN,
    "model.compute_dtype": _one_of(*COMPUTE_DTYPES),
    "task.name": _one_of(*TASKS),
    "task.length": _at_least(1),
    "task.vocab_size": _at_least(FIRST_SYMBOL + 1),  # PAD, BOS, SEP and one symbol at least
    "task.batch_size": _at_least(1),
    "task.eval_size": _at_least(1),
    "task.eval_seed": _SEED,
    "task.num_classes": _at_least(2),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "mesh.coordinator": (is_host_port, "host:port with a port in [1, 65535], e.g. 10.0.0.1:1234"),
    "mesh.num_processes": _at_least(1),
    "mesh.process_id": _at_least(0),
    "optim.learning_rate": _POSITIVE,
    "optim.schedule": _one_of(*SCHEDULES),
    "optim.warmup_steps": _at_least(0),
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _at_least(0),
    "optim.clip_norm": _POSITIVE,
    "optim.label_smoothing": _UNIT_OPEN,
    "optim.accumulate_steps": _at_least(1),
    "train.steps": _at_least(1),
    "train.eval_every": _at_least(1),
    "train.target_exact_match": _UNIT_CLOSED,
    "train.run_dir": ((lambda v: v != ""), "a non-empty path or null"),
    "train.seed": _SEED,
    "train.steps_per_call": _at_least(1),
    "train.checkpoint_every": _at_least(0),
    "train.keep_checkpoints": _at_least(1),
    "train.on_nonfinite": _one_of("stop", "skip"),
}


def _cross_field_errors(config: Config):
    """Messages for constraints between keys, in order of importance."""
    m, t = config.model, config.task
    if m.d_model % m.num_heads:
        yield (
            f"model.d_model must be divisible by model.num_heads; "
            f"got d_model={m.d_model}, num_heads={m.num_heads}"
        )
    elif m.positions == "rotary" and (m.d_model // m.num_heads) % 2:
        yield (
            f"model.positions=rotary needs an even head dim model.d_model / model.num_heads; "
            f"got {m.d_model} / {m.num_heads} = {m.d_model // m.num_heads}"
        )
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        yield (
            f"model.num_heads must be divisible by model.num_kv_heads; "
            f"got num_heads={m.num_heads}, num_kv_heads={m.num_kv_heads}"
        )
    mesh = config.mesh
    if (
        mesh.num_processes is not None
        and mesh.process_id is not None
        and mesh.process_id >= mesh.num_processes
    ):
        yield (
            f"mesh.process_id must be below mesh.num_processes; got process_id="
            f"{mesh.process_id}, num_processes={mesh.num_processes}"
        )
    o, tr = config.optim, config.train
    if tr.steps % o.accumulate_steps:  # the last micro-batches would be computed and lost
        lower = tr.steps - tr.steps % o.accumulate_steps
        fits = f"train.steps={lower} or " if lower else ""
        yield (
            f"train.steps={tr.steps} is not a multiple of optim.accumulate_steps="
            f"{o.accumulate_steps}: its last {tr.steps % o.accumulate_steps} micro-batches "
            f"would make no update; use {fits}train.steps={lower + o.accumulate_steps}"
        )
    if tr.checkpoint_every and tr.checkpoint_every % chunk_size(tr):
        yield (
            f"train.checkpoint_every must be a multiple of {chunk_size(tr)}, the steps fused "
            f"in one call (gcd of train.steps_per_call={tr.steps_per_call} and "
            f"train.eval_every={tr.eval_every}); got {tr.checkpoint_every}"
        )
    if t.name not in TASKS_OF_KIND[m.kind]:
        kinds = [k for k, tasks in TASKS_OF_KIND.items() if t.name in tasks]
        yield (
            f"task {t.name!r} is not a task for model.kind={m.kind} (which learns "
            f"{', '.join(TASKS_OF_KIND[m.kind])}); use model.kind={' or '.join(kinds)}"
        )
        return
    if t.name == "translate":
        from jaxattn.train.language import VOCAB_SIZE

        if t.length < 5:
            yield f"task.length must be >= 5 for translate (a sentence's 5 slots); got {t.length}"
            return
        if t.vocab_size < VOCAB_SIZE:
            yield (
                f"task.vocab_size must be >= {VOCAB_SIZE} for translate (the words of its two "
                f"languages and PAD, BOS, SEP); got {t.vocab_size}"
            )
    if t.name == "classify" and t.num_classes > t.vocab_size - FIRST_SYMBOL:
        yield (
            f"task.num_classes must be <= task.vocab_size - {FIRST_SYMBOL} (each class is a "
            f"symbol); got num_classes={t.num_classes}, vocab_size={t.vocab_size}"
        )
    if m.max_len < model_length(t, m.kind):
        yield (
            f"model.max_len must be >= {model_length(t, m.kind)}, the longest sequence "
            f"model.kind={m.kind} reads for task {t.name!r} with task.length={t.length}; "
            f"got {m.max_len}"
        )


def _parse_yaml(text: str, source: str):
    try:
        return _yaml.load(text)
    except _yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"invalid YAML in {source}: {problem}{where}") from None


def _show(value) -> str:
    """A value as the user wrote it, one line, truncated."""
    if value is None or isinstance(value, bool):
        return _yaml.scalar(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(key: str) -> ConfigError:
    """Unknown dotted key: suggest the closest valid key, else list the allowed ones."""
    section, _, leaf = key.rpartition(".")
    close = [k for k in _KEYS if k.rpartition(".")[2] == leaf]  # right key, wrong section
    if not close and section in _SECTIONS:
        leaves = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        close = [f"{section}.{m}" for m in difflib.get_close_matches(leaf, leaves, n=1)]
    elif not close:
        close = difflib.get_close_matches(key, [*_TOP_KEYS, *_KEYS], n=1)
    if close:
        return ConfigError(
            f"unknown config key {key!r}; did you mean " + " or ".join(map(repr, close)) + "?"
        )
    if section in _SECTIONS:
        allowed = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
        return ConfigError(f"unknown config key {key!r}; allowed keys in {section}: {allowed}")
    return ConfigError(
        f"unknown config key {key!r}; allowed top-level keys: {', '.join(_TOP_KEYS)}"
    )


def _merge(raw: dict, data: dict, source: str) -> None:
    """Fold a parsed ``{name, section: {key: value}}`` mapping from ``source`` into ``raw``."""
    for key, value in data.items():
        key = str(key)
        if "." in key and key.split(".")[0] in _SECTIONS:  # overrides arrive nested
            section, _, leaf = key.partition(".")
            raise ConfigError(
                f"{source}: dotted key {key!r} is for the command line; in a YAML file nest it "
                f"under its section ({section}: then {leaf}: indented below it)"
            )
        if key == "name":
            raw["name"] = value
        elif key not in _SECTIONS:
            raise _unknown(key)
        elif value is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: section {key!r} must be a mapping of its keys, "
                    f"got {_show(value)} ({type(value).__name__})"
                )
            for sub, sub_value in value.items():
                if "." in str(sub) and f"{key}.{str(sub).rpartition('.')[2]}" in _KEYS:
                    raise ConfigError(
                        f"{source}: key {sub!r} under {key!r} is dotted; write only "
                        f"{str(sub).rpartition('.')[2]!r} under {key}:"
                    )
                if f"{key}.{sub}" not in _KEYS:
                    raise _unknown(f"{key}.{sub}")
                raw[key][str(sub)] = sub_value


def _override(text: str) -> dict:
    """``'train.steps=500'`` -> ``{'train': {'steps': 500}}``."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"override {text!r} must look like key.sub=value, e.g. train.steps=500")
    if key == "base":
        raise ConfigError(
            f"override {text!r}: base is named only in a config file; write a file with "
            "base: and your keys, and pass that file instead"
        )
    parsed = _parse_yaml(value, f"override {text!r}")
    parts = key.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in _SECTIONS):
        raise _unknown(key)
    return {parts[0]: {parts[1]: parsed}} if len(parts) == 2 else {key: parsed}


def _check(key: str, value):
    """The value of ``key`` with its type and range checked (ints widen to floats)."""
    base, optional = _KEYS[key]
    if value is None and optional:
        return None
    is_bool = isinstance(value, bool)
    ok = {
        bool: is_bool,
        int: isinstance(value, int) and not is_bool,
        float: isinstance(value, (int, float)) and not is_bool,
        str: isinstance(value, str),
    }[base]
    if not ok:
        wanted = _TYPE_NAMES[base] + (" or null" if optional else "")
        raise ConfigError(f"{key} must be {wanted}, got {_show(value)} ({type(value).__name__})")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite float, got {_show(value)}")
    rule = _RULES.get(key)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{key} must be {rule[1]}; got {_show(value)}")
    return value


def _read_mapping(path: Path, named_by: Path | None) -> dict:
    """The top-level mapping of the YAML file ``path`` ({} when empty); ``named_by`` is the
    file that names ``path`` as its base (None for the file given)."""
    where, kind = ("", "config file") if named_by is None else (f"{named_by}: ", "base file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}{kind} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}cannot read {kind} {path}: {err}") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a mapping with keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}"
        )
    return data


def _base_chain(path: Path) -> list[tuple[Path, dict]]:
    """``[(file, its mapping without 'base'), ...]``: ``path``, then its base, the base's
    base, and so on. A base is a path relative to the file that names it; a base named
    again (a cycle) is refused."""
    chain: list[tuple[Path, dict]] = []
    named_by = None
    while True:
        if any(path.resolve() == seen.resolve() for seen, _ in chain):
            cycle = " -> ".join(str(p) for p in [*(seen for seen, _ in chain), path])
            raise ConfigError(f"config files name each other as base: {cycle}")
        data = _read_mapping(path, named_by)
        base = data.pop("base", None)
        chain.append((path, data))
        if base is None:
            return chain
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(
                f"{path}: base must be the path of a config file, relative to this file's "
                f"folder (e.g. base: tiny.yaml); got {_show(base)} ({type(base).__name__})"
            )
        named_by, path = path, path.parent / base


def load_config(path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate, and build a Config.

    A file may name another as its ``base`` (a path relative to the file, e.g. ``base:
    tiny.yaml``), itself possibly with a base: the deepest base is read first, each file's
    keys override those of its base, and ``overrides`` (in order) override them all. Keys
    that no file sets take the dataclass defaults. ``name`` is the run's own: the ``name``
    of the file given, else its file stem; a base's ``name`` is not inherited.

    Raises ConfigError (one line naming the key, the bad value and what is allowed).
    """
    path = Path(path)
    (_, data), *bases = _base_chain(path)
    raw: dict = {"name": path.stem, **{s: {} for s in _SECTIONS}}
    for base, base_data in reversed(bases):
        _merge(raw, {k: v for k, v in base_data.items() if k != "name"}, str(base))
    _merge(raw, data, str(path))
    for text in overrides:
        _merge(raw, _override(text), f"override {text!r}")
    sections = {
        s: cls(**{k: _check(f"{s}.{k}", v) for k, v in raw[s].items()})
        for s, cls in _SECTIONS.items()
    }
    config = Config(name=_check("name", raw["name"]), **sections)
    error = next(_cross_field_errors(config), None)
    if error:
        raise ConfigError(error)
    return config


def dump_config(config: Config) -> str:
    """``config`` as YAML that load_config reads back: every key (name, model, task, optim,
    train), resolved, with no ``base`` (what a run directory keeps as its config.yaml)."""
    text = _yaml.dump(to_dict(config))
    return f"# resolved config of run {config.name!r}, written by jaxattn\n{text}"


def chunk_size(train: TrainConfig) -> int:
    """Steps fused in one jitted call: ``steps_per_call``, cut so that chunks end on every
    evaluation (and so on every checkpoint, a multiple of it)."""
    return math.gcd(train.steps_per_call, train.eval_every)


def checkpoint_every(train: TrainConfig) -> int:
    """Steps between checkpoints; 0 = only at the end (and when stopped)."""
    return train.eval_every if train.checkpoint_every is None else train.checkpoint_every


def run_dir_for(config: Config) -> Path:
    """``train.run_dir`` if set (``~`` expanded), else ``runs/<name>``."""
    if config.train.run_dir:
        return Path(config.train.run_dir).expanduser()
    return Path("runs") / config.name
