"""The Lightning layer: strategies, callbacks and data handling for Trainer and Fabric.

* :mod:`.strategies` — the DDP and FSDP2 strategies (Trainer and Fabric) and their shared hooks;
* :mod:`.data` — the sequence-sharding collate and :func:`~.data.shard_batch`;
* :mod:`.packing` — packing documents into rows;
* :mod:`.callbacks` — :class:`~.callbacks.TiledLossCallback`;
* :mod:`.metrics` — metrics over the whole sequence;
* :mod:`.throughput` — :class:`~.throughput.UlyssesThroughputMonitor`;
* :mod:`.activation_checkpointing` — checkpointing of decoder layers under FSDP2.
"""
