"""The names of the device-mesh axes, said once: the model reads them to attend per shard
(:func:`jaxattn.nn.layers.per_shard`), the trainer builds its mesh and sharding rules from
them (:mod:`jaxattn.train.sharding`).

- ``data``: the batch is split across it; parameters are replicated along it.
- ``fsdp``: the batch is split across it too, and so is every weight matrix's model width.
- ``tensor``: the heads, the feed-forward hidden width and the vocabulary are split across it.
"""

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)  # the trainer's mesh, in this order
BATCH_AXES = (DATA, FSDP)  # the axes a batch's first dimension is split over
HEAD_AXIS = TENSOR  # the axis the attention heads are split over
