"""The model layer: what is done to one transformers model so that it runs exactly under SP.

* :mod:`.analysis` — decides from the model's structure, before any forward, whether and how it
  runs exactly (:func:`~.analysis.analyse_model`, :class:`~.analysis.UnsupportedModelError`);
* :mod:`.preflight` — what can be refused before the first forward: ``sp`` against the heads and the
  world, attention backends that cannot run or train here;
* :mod:`.apply` — :func:`~.apply.apply_ulysses` and its reversible :class:`~.apply.UlyssesHandle`;
* :mod:`.context` — the per-forward state every layer and the loss share;
* :mod:`.positions` — global positions derived as the model would derive them;
* :mod:`.moe` — the MoE load-balancing loss made global over the sequence;
* :mod:`.mixers` — SP execution of non-attention token mixers (linear attention, Mamba);
* :mod:`.whole_sequence` — what a model derives from the whole row (RoPE scaling, cache offsets)
  derived on it;
* :mod:`.multimodal` — vision-language models: images encoded and merged on the full row, then sharded;
* :mod:`.vision_sp` — a batch's images encoded split over the SP ranks and all-gathered;
* :mod:`.patching` — reversible, ordered wrappers around one model's ``forward``;
* :mod:`.source` — the source text the analysis reads, each model file parsed once;
* :mod:`.debug` — the ``debug_skip_attention`` stand-in.
"""
