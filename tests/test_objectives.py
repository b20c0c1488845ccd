"""The SP-objective API: hand-written cross-entropy (plain and per-token weighted), DPO with a frozen
reference model and token-level KL distillation equal the non-SP computation, and the check that
tells rank-local losses apart."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_ulysses import (apply_tiled_loss, apply_ulysses, is_sp_reduced, shard_batch, sp_gather_tokens,
                               sp_num_valid_tokens, sp_sequence_sum, sp_shift_labels, sp_token_mean, token_logprobs)
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.lightning_setup import LM, Samples, loader, reference_fit, replica_order, trainer_kwargs
from tests.models import tiny_model, tokens

SEQ, BETA = 30, 0.1  # the usual DPO beta; the loss stays near log 2, away from float32 cancellation


def _models():
    # Two separately built configs: transformers shares one config object between models built from it.
    return tiny_model("llama", 4, 2, seed=0), tiny_model("llama", 4, 2, seed=1)


def _batch():
    ids = tokens(2, SEQ, seed=7)  # row 0: "chosen", row 1: "rejected" for DPO
    labels = ids.clone()
    labels[1, :6] = -100  # a prompt that is not scored
    return {"input_ids": ids, "labels": labels}


def _kl_per_token(student_logits, teacher_logits):
    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(teacher || student): [b, s]


def _objectives(policy, ref, batch, forward, group):
    """Each objective written with the API, as a user would: {name: loss builder}."""

    def ce():
        logits = policy(**forward).logits
        labels = sp_shift_labels(batch, group)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                    reduction="none").view(labels.shape)
        return sp_token_mean(per_token, labels != -100, group)

    def weighted_ce():  # float per-token weights, which form the denominator too
        logits = policy(**forward).logits
        labels = sp_shift_labels(batch, group)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                    reduction="none").view(labels.shape)
        weights = (1 + labels.clamp_min(0) % 7 / 7) * (labels != -100)  # per target token, any float
        return sp_token_mean(per_token, weights, group)

    def dpo():
        labels = sp_shift_labels(batch, group)
        valid = labels != -100
        pi = sp_sequence_sum(token_logprobs(policy(**forward).logits, labels), valid, group)
        with torch.no_grad():
            ref_lp = sp_sequence_sum(token_logprobs(ref(**forward).logits, labels), valid, group)
        margin = (pi[0] - ref_lp[0]) - (pi[1] - ref_lp[1])
        return -F.logsigmoid(BETA * margin)

    def kl():
        labels = sp_shift_labels(batch, group)
        with torch.no_grad():
            teacher = ref(**forward).logits
        return sp_token_mean(_kl_per_token(policy(**forward).logits, teacher), labels != -100, group)

    def kl_gathered():  # the same KL through the differentiable gather
        labels = sp_shift_labels(batch, group)
        with torch.no_grad():
            teacher = ref(**forward).logits
        per_token = sp_gather_tokens(_kl_per_token(policy(**forward).logits, teacher), group)
        valid = sp_gather_tokens(labels != -100, group)
        return per_token[valid].mean()

    return {"ce": ce, "weighted_ce": weighted_ce, "dpo": dpo, "kl": kl, "kl_gathered": kl_gathered}


def _reference():
    """Plain torch on the full sequences, written without the API."""
    policy, ref = _models()
    batch = _batch()
    ids, labels = batch["input_ids"], batch["labels"]
    target = labels[:, 1:]
    valid = target != -100

    def seq_logps(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        return (lp * valid).sum(1)

    def ce():
        logits = policy(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)

    def weighted_ce():
        logits = policy(input_ids=ids).logits
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                    reduction="none").view(target.shape)
        w = (1 + target.clamp_min(0) % 7 / 7) * valid
        return (per_token * w).sum() / w.sum()

    def dpo():
        pi = seq_logps(policy(input_ids=ids).logits)
        with torch.no_grad():
            r = seq_logps(ref(input_ids=ids).logits)
        return -F.logsigmoid(BETA * ((pi[0] - r[0]) - (pi[1] - r[1])))

    def kl():
        with torch.no_grad():
            teacher = ref(input_ids=ids).logits
        return _kl_per_token(policy(input_ids=ids).logits, teacher)[:, :-1][valid].mean()

    out = {}
    for name, fn in {"ce": ce, "weighted_ce": weighted_ce, "dpo": dpo, "kl": kl, "kl_gathered": kl}.items():
        policy.zero_grad()
        loss = fn()
        loss.backward()
        out[name] = (loss.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()]))
    # The API without SP (group None, no strategy running) computes the same objectives.
    api = {}
    for name, fn in _objectives(policy, ref, batch, {"input_ids": ids}, None).items():
        api[name] = fn().detach()
    return out, api


def _sp_objectives(rank, world):
    group = dist.group.WORLD
    policy, ref = _models()
    apply_ulysses(policy, group)
    apply_ulysses(ref, group)
    batch = shard_batch(_batch(), rank, world)
    forward = {k: v for k, v in batch.items() if not k.endswith("labels")}  # the model inputs, as sharded
    # The labels shifted on the gathered sequence equal those the sharding put in the batch.
    rebuilt = sp_shift_labels({"labels": batch["labels"]}, group)
    count = sp_num_valid_tokens(batch["shift_labels"], group)
    results = {}
    for name, fn in _objectives(policy, ref, batch, forward, group).items():
        policy.zero_grad()
        loss = fn()
        reduced = is_sp_reduced(loss)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
        dist.all_reduce(grad)  # what DDP does over dp x sp ranks (dp = 1 here): the mean
        results[name] = (loss.detach(), grad / world, reduced)

    # The guard's predicate: the supported losses went through an SP reduction, a local one did not.
    logits = policy(**forward).logits
    local = F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)
    hf_loss = policy(**forward, labels=batch["labels"], shift_labels=batch["shift_labels"]).loss
    tiled = apply_tiled_loss(policy, shards=2)
    tiled_loss = policy(**forward, labels=batch["labels"], shift_labels=batch["shift_labels"]).loss
    tiled.remove()
    checks = dict(local=is_sp_reduced(local), hf=is_sp_reduced(hf_loss), tiled=is_sp_reduced(tiled_loss))
    return results, checks, torch.equal(rebuilt, batch["shift_labels"]), int(count)


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("sp", [2, 4])
def test_objectives_match_non_sp(sp, reference):
    expected, api_without_sp = reference
    results = run_distributed(_sp_objectives, sp)
    n_valid = int((_batch()["labels"][:, 1:] != -100).sum())
    for rank, (per_objective, checks, rebuilt_ok, count) in enumerate(results):
        assert rebuilt_ok, "sp_shift_labels from gathered labels differs from the sharded batch's shift_labels"
        assert count == n_valid
        assert checks == dict(local=False, hf=True, tiled=True), checks
        for name, (loss, grad, reduced) in per_objective.items():
            ref_loss, ref_grad = expected[name]
            assert reduced, f"{name}: no SP reduction found in the loss graph"
            assert_close_rel(loss, ref_loss, name=f"{name} loss (rank {rank})")
            assert_close_rel(grad, ref_grad, name=f"{name} grad (rank {rank})")
            assert grad_ratio(grad, ref_grad) == pytest.approx(1.0, abs=1e-5), name
    for name, value in api_without_sp.items():
        assert_close_rel(value, expected[name][0], name=f"{name} without SP")


def test_token_mean_of_nothing_is_zero():
    values = torch.randn(2, 4, requires_grad=True)
    loss = sp_token_mean(values, torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(values.grad, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="leading dims"):
        sp_token_mean(values, torch.ones(4, 2, dtype=torch.bool))
    assert not is_sp_reduced(values.sum())


class CompiledFunction(torch.autograd.Function):
    """Stands in for a torch.compile region (its backward node has the same name), without compiling."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_compiled_regions_count_as_reduced():
    x = torch.randn(3, requires_grad=True)
    assert type(CompiledFunction.apply(x).grad_fn).__name__ == "CompiledFunctionBackward"
    assert is_sp_reduced(CompiledFunction.apply(x).sum())  # opaque: no false alarm on correct code


# -- the strategy's loss check, under the Trainer ----------------------------------------------


class LocalCE(LM):
    """The silent mistake: cross-entropy of this rank's chunk, averaged locally."""

    def training_step(self, batch, batch_idx):
        logits = self.model(**{k: v for k, v in batch.items() if not k.endswith("labels")}).logits
        return F.cross_entropy(logits.flatten(0, 1), sp_shift_labels(batch).flatten(), ignore_index=-100)


class ApiCE(LM):
    """The same cross-entropy made exact with the API (group from the running strategy)."""

    def training_step(self, batch, batch_idx):
        logits = self.model(**{k: v for k, v in batch.items() if not k.endswith("labels")}).logits
        labels = sp_shift_labels(batch)
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                    reduction="none").view(labels.shape)
        return sp_token_mean(per_token, labels != -100)


class DPO(LM):
    """Policy + frozen reference model in one LightningModule; rows of a batch: chosen, rejected."""

    def __init__(self):
        super().__init__()
        self.model, self.ref = _models()  # the strategy applies Ulysses to both
        self.ref.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        labels = sp_shift_labels(batch)
        forward = {k: v for k, v in batch.items() if not k.endswith("labels")}
        pi = sp_sequence_sum(token_logprobs(self.model(**forward).logits, labels), labels != -100)
        with torch.no_grad():
            ref = sp_sequence_sum(token_logprobs(self.ref(**forward).logits, labels), labels != -100)
        return -F.logsigmoid(BETA * ((pi[0] - ref[0]) - (pi[1] - ref[1])))


def _trainer_guard(rank, world):
    import lightning.pytorch as pl

    from lightning_ulysses import UlyssesStrategy

    def fit(lm, batch_size=1, **strategy_kwargs):
        trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2, **strategy_kwargs), max_steps=2,
                             **trainer_kwargs(devices=2))
        trainer.fit(lm, train_dataloaders=loader(Samples(4, 30), batch_size=batch_size))
        return {k: v.clone() for k, v in lm.model.state_dict().items()}

    with pytest.raises(RuntimeError, match=r"never went through a reduction over the SP group.*sp_token_mean"):
        fit(LocalCE())
    fit(LocalCE(), check_loss=False)  # the explicit opt-out
    return fit(ApiCE()), fit(DPO(), batch_size=2)


def _reference_dpo():
    lm, ds = DPO(), Samples(4, 30)
    opt = lm.configure_optimizers()
    order = replica_order(4, 1, 0)[0]
    for step in range(2):
        idx = order[2 * step: 2 * step + 2]
        ids, labels = ds.ids[idx], ds.labels[idx]
        target, valid = labels[:, 1:], labels[:, 1:] != -100

        def logps(model):
            lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            return (lp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * valid).sum(1)

        pi = logps(lm.model)
        with torch.no_grad():
            ref = logps(lm.ref)
        opt.zero_grad()
        (-F.logsigmoid(BETA * ((pi[0] - ref[0]) - (pi[1] - ref[1])))).backward()
        opt.step()
    return lm.model.state_dict()


def test_strategy_refuses_rank_local_loss_and_trains_api_losses_exactly():
    results = run_distributed(_trainer_guard, 2)
    ref = LM()
    reference_fit(ref, Samples(4, 30), 2, dp=1)
    ref_dpo = _reference_dpo()
    for ce_state, dpo_state in results:
        for k, v in ref.model.state_dict().items():
            assert_close_rel(ce_state[k], v, name=k)
        for k, v in ref_dpo.items():
            assert_close_rel(dpo_state[k], v, name=f"DPO {k}")
