"""Config loading, base files, overrides, round trip, and the one-line error messages."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from jaxattn.nn.config import ACTIVATIONS, KINDS, NORMS, POSITIONS
from jaxattn.train import _yaml, optim, tasks
from jaxattn.train.config import (
    Config,
    ConfigError,
    ModelConfig,
    dump_config,
    load_config,
    run_dir_for,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
TINY = CONFIGS / "tiny.yaml"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path, overrides=()) -> str:
    """The ConfigError message, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------ shipped configs


def test_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {
        "tiny",
        "reverse",
        "sort",
        "next_token",
        "translate",
        "classify",
        "copy_seq2seq",
    }


# The configs whose task is not their name: the model kind is what differs from tiny.yaml.
_TASK_OF = {"tiny": "copy", "copy_seq2seq": "copy"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.name == path.stem
    assert config.model.max_len >= tasks.model_length(config.task, config.model.kind)
    assert run_dir_for(config) == Path("runs") / path.stem
    assert config.task.name == _TASK_OF.get(path.stem, path.stem)
    assert config.task.name in tasks.TASKS_OF_KIND[config.model.kind]


def test_defaults_are_tiny():
    """The dataclass defaults and tiny.yaml are one set of values: they cannot drift."""
    assert load_config(TINY) == Config(name="tiny")
    assert "base" not in yaml.safe_load(TINY.read_text())  # the root: it states every key


def test_tiny_values():
    c = load_config(TINY)
    assert (c.model, c.model.max_len) == (ModelConfig(), 32)
    assert (c.task.name, c.task.length, c.task.vocab_size) == ("copy", 10, 16)
    assert c.optim.learning_rate == pytest.approx(3e-3)
    assert c.optim.eps == pytest.approx(1e-9)
    assert c.optim.label_smoothing == pytest.approx(0.1)
    assert (c.optim.schedule, c.optim.clip_norm) == ("warmup_cosine", 1.0)
    assert (c.train.steps, c.train.eval_every) == (1500, 50)
    assert (c.train.target_exact_match, c.train.run_dir) == (1.0, None)


def test_tiny_documents_every_field():
    text = TINY.read_text()
    assert "python train.py --config configs/tiny.yaml" in text
    assert re.search(r"^# base: .*#", text, re.M)
    data = yaml.safe_load(text)
    for section, values in to_dict(Config()).items():
        if section == "name":
            assert re.search(r"^# name: .*#", text, re.M)
            continue
        assert set(data[section]) == set(values), section
        for key in values:
            assert re.search(rf"^  {key}: .*# \w", text, re.M), f"{section}.{key} has no comment"


# ---------------------------------------------------------------------------------- overrides


def test_default_name_is_file_stem(tmp_path):
    assert load_config(write(tmp_path, "", "my-run.yaml")).name == "my-run"
    assert load_config(write(tmp_path, "name: other\n")).name == "other"


def test_missing_sections_take_defaults(tmp_path):
    config = load_config(write(tmp_path, "model:\ntask: {}\n"))
    assert config == Config(name="exp")


def test_overrides_of_each_type():
    config = load_config(
        TINY,
        [
            "train.steps=500",  # int
            "optim.learning_rate=1e-3",  # float in exponent form
            "optim.weight_decay=1",  # int widened to float
            "train.progress=false",  # bool
            "optim.clip_norm=null",  # null
            "model.num_kv_heads=2",  # int into an optional field
            "model.positions=rotary",  # string
            "train.run_dir=/tmp/somewhere",  # string into an optional field
            "name=foo",  # top-level
        ],
    )
    assert config.train.steps == 500
    assert config.optim.learning_rate == pytest.approx(1e-3)
    assert isinstance(config.optim.weight_decay, float) and config.optim.weight_decay == 1.0
    assert config.train.progress is False
    assert config.optim.clip_norm is None
    assert config.model.num_kv_heads == 2
    assert config.model.positions == "rotary"
    assert config.train.run_dir == "/tmp/somewhere"
    assert run_dir_for(config) == Path("/tmp/somewhere")
    assert config.name == "foo"
    assert run_dir_for(dataclasses.replace(config, train=load_config(TINY).train)) == Path(
        "runs/foo"
    )


def test_later_override_wins_and_file_keys_kept(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n  seed: 3\n")
    config = load_config(path, ["train.steps=8", "train.steps=9"])
    assert (config.train.steps, config.train.seed) == (9, 3)


def test_exponent_floats_in_file(tmp_path):
    config = load_config(write(tmp_path, "optim:\n  learning_rate: 5e-4\n  eps: 1E-8\n"))
    assert config.optim.learning_rate == pytest.approx(5e-4)
    assert config.optim.eps == pytest.approx(1e-8)


# --------------------------------------------------------------------------------- base files


@pytest.mark.parametrize("path", [p for p in SHIPPED if p != TINY], ids=lambda p: p.stem)
def test_shipped_configs_state_only_what_differs_from_tiny(path):
    data = yaml.safe_load(path.read_text())
    assert data.pop("base") == "tiny.yaml"
    tiny = to_dict(load_config(TINY))
    for section, values in data.items():
        for key, value in values.items():
            assert value != tiny[section][key], f"{path.name} repeats tiny's {section}.{key}"


def test_base_then_file_then_overrides(tmp_path):
    write(tmp_path, "model:\n  d_model: 32\ntrain:\n  steps: 7\n  seed: 3\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\ntrain:\n  steps: 8\n")
    config = load_config(path)
    assert (config.model.d_model, config.train.steps, config.train.seed) == (32, 8, 3)
    assert config.train.eval_every == Config().train.eval_every  # set nowhere: the default
    config = load_config(path, ["train.steps=9", "train.seed=4"])
    assert (config.model.d_model, config.train.steps, config.train.seed) == (32, 9, 4)


def test_nested_bases_are_relative_to_the_file_naming_them(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a", "optim:\n  warmup_steps: 3\ntrain:\n  seed: 5\n", "grand.yaml")
    write(tmp_path / "b", "base: ../a/grand.yaml\ntrain:\n  seed: 6\n", "parent.yaml")
    path = write(tmp_path, "base: b/parent.yaml\ntask:\n  length: 4\n")
    monkeypatch.chdir(tmp_path / "a")  # not the folder of any of them
    config = load_config(path)
    assert (config.optim.warmup_steps, config.train.seed, config.task.length) == (3, 6, 4)


def test_name_is_the_given_files_own(tmp_path):
    write(tmp_path, "name: basename\ntrain:\n  seed: 1\n", "base.yaml")
    assert load_config(tmp_path / "base.yaml").name == "basename"
    assert load_config(write(tmp_path, "base: base.yaml\n", "child.yaml")).name == "child"
    assert load_config(write(tmp_path, "base: base.yaml\nname: mine\n")).name == "mine"
    assert load_config(tmp_path / "child.yaml", ["name=cli"]).name == "cli"


def test_null_base_is_no_base(tmp_path):
    assert load_config(write(tmp_path, "base: null\n")) == Config(name="exp")


def test_based_config_is_written_out_whole(tmp_path):
    """A run directory's config.yaml is the resolved config, without base: it loads back
    equal wherever it is copied, and equal to the config of the file that has a base."""
    config = load_config(CONFIGS / "reverse.yaml", ["train.steps=100"])
    path = write(tmp_path, dump_config(config), "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert "base" not in data
    assert {s: set(v) for s, v in data.items() if s != "name"} == {
        s: set(v) for s, v in to_dict(Config()).items() if s != "name"
    }
    assert load_config(path) == config


def test_base_cycle_is_refused_naming_it(tmp_path):
    a = write(tmp_path, "base: b.yaml\n", "a.yaml")
    b = write(tmp_path, "base: a.yaml\n", "b.yaml")
    assert error(a) == f"config files name each other as base: {a} -> {b} -> {tmp_path / 'a.yaml'}"
    self_based = write(tmp_path, "base: ./exp.yaml\n")
    assert error(self_based) == (
        f"config files name each other as base: {self_based} -> {tmp_path / './exp.yaml'}"
    )


def test_missing_base_is_refused(tmp_path):
    path = write(tmp_path, "base: nope.yaml\n")
    assert error(path) == f"{path}: base file not found: {tmp_path / 'nope.yaml'}"
    (tmp_path / "dir.yaml").mkdir()
    message = error(write(tmp_path, "base: dir.yaml\n"))
    assert message.startswith(f"{path}: cannot read base file {tmp_path / 'dir.yaml'}: ")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("5", "5 (int)"),
        ("[a.yaml]", "['a.yaml'] (list)"),
        ("{x: 1}", "{'x': 1} (dict)"),
        ("''", "'' (str)"),
        ("true", "true (bool)"),
    ],
)
def test_base_of_the_wrong_type_is_refused(tmp_path, value, shown):
    path = write(tmp_path, f"base: {value}\n")
    message = error(path)
    assert message.startswith(f"{path}: base must be the path of a config file")
    assert message.endswith(f"got {shown}")


def test_errors_in_a_base_name_the_base(tmp_path):
    base = write(tmp_path, "- 1\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\n")
    assert error(path).startswith(f"{base} must be a mapping with keys base, name, model")
    write(tmp_path, "model: 64\n", "base.yaml")
    assert error(path).startswith(f"{base}: section 'model' must be a mapping")
    write(tmp_path, "train:\n  steps: [1\n", "base.yaml")
    assert error(path).startswith(f"invalid YAML in {base}: ")
    write(tmp_path, "train:\n  setps: 1\n", "base.yaml")
    assert error(path) == "unknown config key 'train.setps'; did you mean 'train.steps'?"


def test_base_is_not_a_command_line_override():
    message = error(TINY, ["base=other.yaml"])
    assert message.startswith("override 'base=other.yaml': base is named only in a config file")
    assert "did you mean 'base'?" in error(TINY, ["bsae=other.yaml"])


# --------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optim.clip_norm=null", "model.num_kv_heads=1", "train.run_dir=out/x", "name='1e3'"],
        ["optim.learning_rate=1e-4", "optim.eps=1e-12", "train.progress=false"],
    ],
)
def test_save_load_round_trip(tmp_path, overrides):
    config = load_config(TINY, overrides)
    path = tmp_path / "saved" / "config.yaml"
    path.parent.mkdir()
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert list(yaml.safe_load(path.read_text())) == [
        "name",
        "model",
        "task",
        "optim",
        "train",
        "mesh",
    ]


# ----------------------------------------------------------------------------- error messages


def test_unknown_key_with_suggestion(tmp_path):
    message = error(write(tmp_path, "train:\n  setps: 10\n"))
    assert message == "unknown config key 'train.setps'; did you mean 'train.steps'?"
    assert error(TINY, ["train.setps=5"]) == message
    assert "did you mean 'model.d_model'?" in error(TINY, ["modle.d_model=5"])
    assert "did you mean 'train'?" in error(write(tmp_path, "trian:\n  steps: 1\n"))
    # The right key in the wrong section.
    assert "did you mean 'train.steps'?" in error(TINY, ["model.steps=5"])


def test_unknown_key_without_close_match(tmp_path):
    message = error(TINY, ["train.zzz=1"])
    assert message.startswith("unknown config key 'train.zzz'; allowed keys in train: steps, ")
    assert "target_exact_match" in message and "progress" in message
    message = error(write(tmp_path, "qqqq: 1\n"))
    expected = (
        "unknown config key 'qqqq'; allowed top-level keys: "
        "base, name, model, task, optim, train, mesh"
    )
    assert message == expected
    assert "unknown config key 'model.d_model.x'" in error(TINY, ["model.d_model.x=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=10x", "train.steps must be an int, got '10x' (str)"),
        ("train.steps=true", "train.steps must be an int, got true (bool)"),
        ("train.steps=1.5", "train.steps must be an int, got 1.5 (float)"),
        ("train.steps=null", "train.steps must be an int, got null (NoneType)"),
        ("model.num_kv_heads=two", "model.num_kv_heads must be an int or null, got 'two' (str)"),
        ("optim.learning_rate=fast", "optim.learning_rate must be a float, got 'fast' (str)"),
        ("optim.learning_rate=false", "optim.learning_rate must be a float, got false (bool)"),
        ("optim.clip_norm=[1]", "optim.clip_norm must be a float or null, got [1] (list)"),
        ("optim.eps=.nan", "optim.eps must be a finite float, got nan"),
        ("train.progress=1", "train.progress must be a bool (true or false), got 1 (int)"),
        ("train.progress=yes please", "train.progress must be a bool (true or false), got"),
        ("model.positions=3", "model.positions must be a string, got 3 (int)"),
        ("name=null", "name must be a string, got null (NoneType)"),
    ],
)
def test_wrong_type(override, expected):
    assert error(TINY, [override]).startswith(expected)


def test_wrong_type_in_file(tmp_path):
    message = error(write(tmp_path, "train:\n  steps: '10x'\n"))
    assert message == "train.steps must be an int, got '10x' (str)"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=0", "train.steps must be >= 1; got 0"),
        ("model.d_model=-64", "model.d_model must be >= 1; got -64"),
        ("task.vocab_size=3", "task.vocab_size must be >= 4; got 3"),
        ("task.vocab_size=0", "task.vocab_size must be >= 4; got 0"),
        ("task.length=0", "task.length must be >= 1; got 0"),
        ("task.length=-2", "task.length must be >= 1; got -2"),
        ("task.eval_size=0", "task.eval_size must be >= 1; got 0"),
        ("task.batch_size=0", "task.batch_size must be >= 1; got 0"),
        ("train.target_exact_match=1.5", "train.target_exact_match must be in [0, 1]; got 1.5"),
        ("model.dropout=1.0", "model.dropout must be in [0, 1); got 1.0"),
        ("optim.label_smoothing=-0.1", "optim.label_smoothing must be in [0, 1); got -0.1"),
        ("optim.learning_rate=0", "optim.learning_rate must be > 0; got 0.0"),
        ("optim.b2=1", "optim.b2 must be in [0, 1); got 1.0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0; got -1"),
        ("optim.accumulate_steps=0", "optim.accumulate_steps must be >= 1; got 0"),
        ("optim.clip_norm=0", "optim.clip_norm must be > 0; got 0.0"),
        ("train.run_dir=''", "train.run_dir must be a non-empty path or null; got ''"),
        ("name=a/b", "name must be a non-empty name of letters, digits, '_', '-' or '.'; got"),
    ],
)
def test_out_of_range(override, expected):
    assert error(TINY, [override]).startswith(expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.positions=rope", "model.positions must be one of sinusoidal, learned, rotary"),
        ("model.activation=swish", "model.activation must be one of relu, gelu; got 'swish'"),
        ("model.norm=mid", "model.norm must be one of pre, post; got 'mid'"),
        (
            "task.name=add",
            "task.name must be one of copy, reverse, sort, next_token, translate, classify;"
            " got 'add'",
        ),
        (
            "optim.schedule=linear",
            "optim.schedule must be one of noam, warmup_cosine, warmup_rsqrt, warmup_constant;"
            " got 'linear'",
        ),
    ],
)
def test_not_in_allowed_set(override, expected):
    assert error(TINY, [override]).startswith(expected)
    assert error(TINY, ["model.positions=rope"]).endswith("; got 'rope'")


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("task.name", tasks.TASKS),
        ("model.kind", KINDS),
        ("optim.schedule", optim.SCHEDULES),
        ("model.positions", POSITIONS),
        ("model.activation", tuple(ACTIVATIONS)),
        ("model.norm", NORMS),
    ],
)
def test_allowed_names_are_those_the_modules_implement(key, names):
    assert f"must be one of {', '.join(names)}; got 'zzz'" in error(TINY, [f"{key}=zzz"])
    section, leaf = key.split(".")
    for name in names:
        more = _WITH.get(f"{key}={name}", [])  # what else the name needs
        config = load_config(TINY, [f"{key}={name}", *more])
        assert getattr(getattr(config, section), leaf) == name


# A task, or a model kind, that tiny.yaml's other keys do not fit.
_WITH = {
    "task.name=translate": ["model.kind=encoder_decoder", "task.vocab_size=47"],
    "task.name=classify": ["model.kind=classifier"],
    "model.kind=classifier": ["task.name=classify"],
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.d_model=62"],
            "model.d_model must be divisible by model.num_heads; got d_model=62, num_heads=4",
        ),
        (
            ["model.num_kv_heads=3"],
            "model.num_heads must be divisible by model.num_kv_heads; got num_heads=4,"
            " num_kv_heads=3",
        ),
        (
            ["task.length=16"],
            "model.max_len must be >= 34, the longest sequence model.kind=decoder reads for"
            " task 'copy' with task.length=16; got 32",
        ),
        (
            ["model.positions=rotary", "model.d_model=36"],
            "model.positions=rotary needs an even head dim model.d_model / model.num_heads;"
            " got 36 / 4 = 9",
        ),
        (
            ["task.name=classify"],
            "task 'classify' is not a task for model.kind=decoder (which learns copy, reverse,"
            " sort, next_token); use model.kind=classifier",
        ),
        (
            ["model.kind=encoder_decoder", "task.name=next_token"],
            "task 'next_token' is not a task for model.kind=encoder_decoder (which learns"
            " copy, reverse, sort, translate); use model.kind=decoder",
        ),
        (
            ["model.kind=encoder_decoder", "task.name=translate", "task.length=4"],
            "task.length must be >= 5 for translate (a sentence's 5 slots); got 4",
        ),
        (
            ["model.kind=encoder_decoder", "task.name=translate", "task.length=9"],
            "task.vocab_size must be >= 47 for translate (the words of its two languages and"
            " PAD, BOS, SEP); got 16",
        ),
        (
            ["model.kind=classifier", "task.name=classify", "task.num_classes=14"],
            "task.num_classes must be <= task.vocab_size - 3 (each class is a symbol); got"
            " num_classes=14, vocab_size=16",
        ),
        (
            ["model.kind=classifier", "task.name=classify", "task.length=33"],
            "model.max_len must be >= 33, the longest sequence model.kind=classifier reads"
            " for task 'classify' with task.length=33; got 32",
        ),
    ],
)
def test_cross_field(overrides, expected):
    assert error(TINY, overrides) == expected


def test_cross_field_boundaries_pass():
    assert load_config(TINY, ["task.length=15"]).model.max_len == 32  # 2 * 15 + 2 = 32
    assert load_config(TINY, ["model.num_kv_heads=4"]).model.num_kv_heads == 4
    assert load_config(TINY, ["model.positions=rotary", "model.d_model=32"]).model.d_model == 32
    seq2seq = ["model.kind=encoder_decoder", "task.length=31"]  # BOS y: 32 tokens
    assert load_config(TINY, seq2seq).task.length == 31
    classify = ["model.kind=classifier", "task.name=classify", "task.length=32"]
    assert load_config(TINY, [*classify, "task.num_classes=13"]).task.num_classes == 13


@pytest.mark.parametrize("override", ["train.steps", "=5", ""])
def test_malformed_override(override):
    message = error(TINY, [override])
    assert message.startswith(f"override {override!r} must look like key.sub=value")


def test_override_with_bad_yaml_value():
    assert error(TINY, ["train.steps=[1"]).startswith("invalid YAML in override 'train.steps=[1'")


def test_override_of_whole_section():
    message = error(TINY, ["model=5"])
    assert (
        message == "override 'model=5': section 'model' must be a mapping of its keys, got 5 (int)"
    )
    assert load_config(TINY, ["model={d_model: 32}"]).model.d_model == 32


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(path) == f"config file not found: {path}"


def test_directory_instead_of_file(tmp_path):
    assert error(tmp_path).startswith(f"cannot read config file {tmp_path}")


def test_bad_yaml(tmp_path):
    path = write(tmp_path, "model:\n  d_model: [64\n  num_heads: 4\n")
    message = error(path)
    assert message.startswith(f"invalid YAML in {path}: ")
    assert "line" in message


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    assert error(path).startswith(f"{path} must be a mapping with keys base, name, model, task")


def test_section_not_a_mapping(tmp_path):
    path = write(tmp_path, "model: 64\n")
    expected = f"{path}: section 'model' must be a mapping of its keys, got 64 (int)"
    assert error(path) == expected
    path = write(tmp_path, "train:\n  - steps\n")
    assert "section 'train' must be a mapping of its keys, got ['steps'] (list)" in error(path)


def test_config_error_is_value_error_and_one_line():
    assert issubclass(ConfigError, ValueError)
    assert str(ConfigError("a\nb")) == "a b"


def test_every_rule_names_a_real_key():
    from jaxattn.train.config import _KEYS, _RULES

    assert set(_RULES) <= set(_KEYS)


# --------------------------------------------------------------- issue 9: seeds, accumulation


@pytest.mark.parametrize("key", ["train.seed", "task.eval_seed"])
@pytest.mark.parametrize("value", [2**32, 2**63, 2**64 + 5, -1])
def test_seed_outside_32_bits_is_refused(key, value):
    # 2**32 silently gave seed 0's run; 2**63 and above gave a traceback.
    message = error(TINY, [f"{key}={value}"])
    assert message.startswith(f"{key} must be in [0, 2**32 - 1]")
    assert message.endswith(f"got {value}")


@pytest.mark.parametrize("key", ["train.seed", "task.eval_seed"])
def test_seed_bounds_in_file_and_accepted(tmp_path, key):
    section, leaf = key.split(".")
    message = error(write(tmp_path, f"{section}:\n  {leaf}: 4294967296\n"))
    assert message.startswith(f"{key} must be in [0, 2**32 - 1]")
    for value in (0, 2**32 - 1):
        config = load_config(TINY, [f"{key}={value}"])
        assert getattr(getattr(config, section), leaf) == value


def test_accumulation_must_leave_an_update():
    # 1000 micro-batches per update in 100 steps made zero updates and exited 0.
    message = error(TINY, ["optim.accumulate_steps=1000", "train.steps=100"])
    assert "optim.accumulate_steps=1000" in message and "train.steps=100" in message
    assert "no update" in message
    assert "no update" in error(TINY, ["optim.accumulate_steps=101", "train.steps=100"])
    config = load_config(TINY, ["optim.accumulate_steps=100", "train.steps=100"])
    assert (config.optim.accumulate_steps, config.train.steps) == (100, 100)


# ------------------------------------------------------------ issue 9: dotted and duplicate keys


def test_dotted_key_at_top_level_says_to_nest_it(tmp_path):
    # It said "did you mean 'train.steps'?", the very key written.
    path = write(tmp_path, "train.steps: 20\n")
    message = error(path)
    assert "did you mean" not in message
    assert str(path) in message and "'train.steps'" in message
    assert "nest it under its section" in message and "train:" in message


def test_dotted_key_inside_a_section(tmp_path):
    message = error(write(tmp_path, "train:\n  train.steps: 20\n"))
    assert "'train.steps' under 'train' is dotted" in message
    assert "write only 'steps' under train:" in message


@pytest.mark.parametrize(
    ("text", "key", "first", "second"),
    [
        ("train:\n  steps: 10\n  seed: 1\n  steps: 20\n", "steps", 2, 4),
        ("train:\n  steps: 10\nmodel:\n  d_model: 32\ntrain:\n  seed: 3\n", "train", 1, 5),
        ("name: a\nname: b\n", "name", 1, 2),
    ],
    ids=["in a section", "section twice", "top-level key"],
)
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, first, second):
    # PyYAML kept the last one silently.
    path = write(tmp_path, text)
    message = error(path)
    assert str(path) in message
    assert f"duplicate key {key!r} (first at line {first})" in message
    assert f"at line {second}," in message


def test_a_merge_key_config_loads_as_the_spelled_out_one(tmp_path):
    # The duplicate-key check refused every merge ("could not determine a constructor for
    # the tag 'tag:yaml.org,2002:merge'").
    spelled = load_config(write(tmp_path, SPELLED_OUT, "spelled.yaml"))
    merged = load_config(write(tmp_path, MERGED, "merged.yaml"))
    assert merged == spelled
    assert (merged.model.d_model, merged.model.num_heads, merged.model.num_layers) == (32, 2, 1)
    assert (merged.train.steps, merged.train.seed) == (7, 7)


SPELLED_OUT = """\
name: exp
model:
  d_model: 32
  num_heads: 2
  num_layers: 1
train:
  steps: 7
  seed: 7
"""
MERGED = """\
name: exp
model:
  <<: &small {d_model: 32, num_heads: 2}
  num_layers: 1
train:
  <<: &seven {steps: 7}
  seed: 7
"""


def test_a_list_merge_takes_the_earlier_mapping_first(tmp_path):
    text = (
        "model:\n"
        "  <<: [&width {d_model: 32, d_ff: 64}, &heads {num_heads: 2, d_model: 48}]\n"
        "  num_layers: 1\n"
    )
    config = load_config(write(tmp_path, text))
    # https://yaml.org/type/merge.html: earlier mappings override later ones (whatever the
    # installed PyYAML does: 6.0.4 lets the later win for keys longer than a character).
    assert (config.model.d_model, config.model.d_ff, config.model.num_heads) == (32, 64, 2)
    assert config.model.num_layers == 1


def test_an_explicit_key_overrides_a_merged_one_wherever_it_stands(tmp_path):
    for text in (
        "model:\n  <<: &small {d_model: 32, num_heads: 2}\n  d_model: 48\n",
        "model:\n  d_model: 48\n  <<: &small {d_model: 32, num_heads: 2}\n",
    ):
        config = load_config(write(tmp_path, text))
        assert (config.model.d_model, config.model.num_heads) == (48, 2)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], w: 3}\nd: {<<: *a, x: 9}\n",
        "a: &a {k: [1, 2], m: {n: 1}}\nb: {<<: *a, n: 2}\nc: *a\n=: 4\n",
        # A mapping with a merge, reused by an alias: its merged keys are not duplicates.
        "first:\n  <<: &d\n    <<: &base {source: staging}\n    source: prod\nsecond: *d\n",
    ],
)
def test_merges_read_as_the_safe_loader_reads_them(text):
    assert _yaml.load(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "model:\n  <<: &w {d_model: 32}\n  d_model: 48\n  d_model: 64\n",
            "'d_model' (first at line 3)",
        ),
        (
            "model:\n  <<: &w {d_model: 32, d_model: 48}\n",
            "duplicate key 'd_model' (first at line 2)",
        ),
        (
            "model:\n  <<: &a {d_model: 32}\n  <<: &b {d_ff: 64}\n",
            "duplicate key '<<' (first at line 2)",
        ),
    ],
    ids=["own keys", "inside a merged mapping", "two merges"],
)
def test_a_duplicate_key_is_still_refused_beside_a_merge(tmp_path, text, says):
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"invalid YAML in {path}: ") and "duplicate key" in message
    assert says in message


@pytest.mark.parametrize(
    ("text", "says", "line"),
    [
        ("model:\n  <<: 32\n", "<< merges a mapping or a list of mappings, not a scalar", 2),
        ("model:\n  <<: [{d_model: 32}, 7]\n", "<< merges a mapping or a list of mappings", 2),
        ("model:\n  <<: !!set {d_model}\n", "<< merges a mapping, not a !!set", 2),
        ("model: &m\n  <<: *m\n", "found unconstructable recursive node", 1),
        ("model:\n  <<: !!python/name:os.system {}\n", "could not determine a constructor", 2),
    ],
    ids=["a scalar", "a scalar in a list", "a set", "itself", "a python tag"],
)
def test_a_merge_of_a_non_mapping_is_one_line(tmp_path, text, says, line):
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"invalid YAML in {path}: {says}")
    assert f" at line {line}," in message


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path):
    config = load_config(write(tmp_path, "model:\n  dropout: 0.1\ntrain:\n  steps: 5\n"))
    assert (config.model.dropout, config.train.steps) == (0.1, 5)
    path = write(tmp_path, "task:\n  name: copy\nname: other\n")
    assert load_config(path).name == "other"


# ---------------------------------------------------------- issue 9: checkpoint and fault keys


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0; got -1"),
        ("train.checkpoint_every=1.5", "train.checkpoint_every must be an int or null, got 1.5"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1; got 0"),
        ("train.keep_checkpoints=null", "train.keep_checkpoints must be an int, got null"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite must be one of stop, skip; got 'ignore'"),
        ("train.on_nonfinite=true", "train.on_nonfinite must be a string, got true (bool)"),
    ],
)
def test_checkpoint_and_nonfinite_keys_are_validated(override, expected):
    assert error(TINY, [override]).startswith(expected)


def test_checkpoint_and_nonfinite_keys_accepted():
    default = load_config(TINY).train
    assert (default.checkpoint_every, default.keep_checkpoints, default.on_nonfinite) == (
        None,
        3,
        "stop",
    )
    for value, expected in (("null", None), ("0", 0), ("150", 150)):
        assert load_config(TINY, [f"train.checkpoint_every={value}"]).train.checkpoint_every == (
            expected
        )
    assert load_config(TINY, ["train.keep_checkpoints=1"]).train.keep_checkpoints == 1
    assert load_config(TINY, ["train.on_nonfinite=skip"]).train.on_nonfinite == "skip"


def test_checkpoint_every_must_fall_between_fused_calls():
    """A checkpoint at step 25 with 50 steps fused per call would cut every call to 25
    steps (slower, and another compile): refused, naming the chunk."""
    message = error(TINY, ["train.checkpoint_every=25"])
    assert message.startswith("train.checkpoint_every must be a multiple of 50")
    assert "train.steps_per_call=50" in message and "got 25" in message
    config = load_config(TINY, ["train.checkpoint_every=25", "train.steps_per_call=25"])
    assert config.train.checkpoint_every == 25


def test_run_dir_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(TINY, ["train.run_dir=~/x"])
    assert config.train.run_dir == "~/x"  # stored as written, expanded where it is used
    assert run_dir_for(config) == tmp_path / "x"


def test_config_error_from_yaml_is_one_line(tmp_path):
    # PyYAML's own messages span several lines (context, problem, marks).
    message = error(write(tmp_path, "train:\n  steps: 1\n   seed: [\n"))
    assert message.startswith("invalid YAML in ")
