"""Which models Ulysses SP runs exactly, found by running them: the support-matrix engine.

One module per job:

* :mod:`.configs` — a tiny random build of any architecture (its default config, or a given one,
  shrunk);
* :mod:`.parity` — one architecture under SP against the untouched model on the same batch:
  ``exact`` / ``refused`` (with the reason) / ``untestable`` / ``wrong`` / ``foreign``;
* :mod:`.variants` — the configuration axis (RoPE types, long windows, ``token_type_ids``, packed rows);
* :mod:`.images` — the image-text-to-text axis (tiny vision towers, image batches across the chunk border);
* :mod:`.reasons` — refusal reasons sorted into classes, each checked against the refused model;
* :mod:`.runner` — the fork-started gloo processes (CPU) the comparisons run on;
* :mod:`.matrix` — every registered causal / masked LM and image-text-to-text architecture, and
  ``docs/supported_models.md``
  (``python -m lightning_ulysses.support.matrix``).

``python -m lightning_ulysses.check`` runs the same comparison for one model.
"""
