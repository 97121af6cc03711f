"""The short run the sharding and many-host tests train: 20 steps of tiny.yaml, evaluated
and checkpointed at steps 10 and 20, on a 1-layer model (it compiles faster, and nothing
those tests check depends on depth)."""

SHORT_RUN = [
    "train.progress=false",
    "train.pictures=false",
    "train.steps=20",
    "train.eval_every=10",
    "train.steps_per_call=10",
    "task.eval_size=64",
    "model.num_layers=1",
]
