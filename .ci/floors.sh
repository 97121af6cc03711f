#!/usr/bin/env bash
# `make test-floors`: the declared dependency floors are true.
#
# Installs, in a venv of its own (default .venv-floors), the package with the LOWEST version
# of every dependency that pyproject.toml declares (each `name>=X` becomes `name==X`, jax's
# floor pins jaxlib too; the viz extra and pytest, pytest-xdist and hypothesis of the dev
# extra likewise), then runs a quick subset: the kernel tests, the model's generation tests,
# one short training (on two host devices, so the sharded path runs) and generation from that
# run.
# Rerunning reuses the venv while the pins are unchanged (stamp: $VENV/.installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FLOORS_VENV:-.venv-floors}
STAMP=$VENV/.installed

# The pins, read from pyproject.toml so the floors are written once (there).
PINS=$("$PYTHON" - <<'EOF'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
reqs = project["dependencies"] + extras["viz"]
reqs += [r for r in extras["dev"] if re.match(r"(pytest|pytest-xdist|hypothesis)\s*>=", r)]
pins = []
for req in reqs:
    # `name>=X`, optionally with excluded versions (`,!=Y`): the floor is X
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*(?:,\s*!=\s*[^,;\s]+\s*)*", req)
    if not m:
        sys.exit(f"floors.sh: {req!r} in pyproject.toml has no plain `>=` floor")
    name, floor = m.groups()
    pins.append(f"{name}=={floor}")
    if name == "jax":
        pins.append(f"jaxlib=={floor}")  # jax's floor with its own jaxlib
print(" ".join(pins))
EOF
)
echo "floors: $PINS"

if [[ -f $STAMP && "$(cat "$STAMP")" == "$PINS" && -x $VENV/bin/python ]]; then
    echo "floors: $VENV is up to date"
else
    echo "floors: installing into $VENV"
    rm -f "$STAMP"
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086  # PINS is a list of words
    "$VENV/bin/python" -m pip install --quiet -e . $PINS
    echo "$PINS" > "$STAMP"
fi
PY=$VENV/bin/python

echo "floors: kernels and generation tests (with XLA's default flags, which the suite changes)"
JAXATTN_TEST_XLA_DEFAULTS=1 "$PY" -m pytest -q -n auto -p no:cacheprovider \
    tests/test_attention.py tests/test_reference.py tests/test_flash.py tests/nn/test_decoding.py

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "floors: a short training on 2 host devices (mesh tensor=2, progress bar, pictures)"
# eval_every=10: five checkpoints, so the manager's keep/best policy deletes some.
if ! XLA_FLAGS=--xla_force_host_platform_device_count=2 "$PY" train.py \
    --config configs/tiny.yaml train.run_dir="$TMP/run" train.steps=50 train.eval_every=10 \
    train.progress=true train.pictures=true task.eval_size=64 mesh.tensor=2 \
    > "$TMP/train.log" 2>&1 ||
    ! [[ -s $TMP/run/attention.png && -s $TMP/run/curves.png ]]; then
    cat "$TMP/train.log"
    echo "floors: the short training FAILED (or drew no pictures)" >&2
    exit 1
fi
grep -E "exact-match" "$TMP/train.log" | tail -n 1

echo "floors: generation from that run"
"$PY" - "$TMP/run" <<'EOF'
import sys

from jaxattn.nn import generate
from jaxattn.train import load_run

model, _ = load_run(sys.argv[1])
out = generate(model, [[1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2]], 10)
assert out.shape == (1, 22), out.shape
print("generated", out.shape)
EOF
echo "floors: all passed"
