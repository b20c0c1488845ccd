"""The loss layer: every objective computed exactly over the whole sequence under SP.

* :mod:`.sp_loss` — the token-mean LM loss over the SP group (docs/sp-loss.md);
* :mod:`.objectives` — the SP-objective API for users' own losses (DPO, distillation, ...);
* :mod:`.tiled_lm_loss` — the LM-head cross-entropy tile by tile, without full logits;
* :mod:`.tiled_hf_loss` — that loss installed on a transformers causal LM.
"""
