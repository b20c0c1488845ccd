"""Packing documents into rows: exact layout, no target or attention across documents, SP parity."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.lightning.packing import PackedDataset, PackingCollator, pack_documents
from tests.distributed import assert_close_rel, assert_sp_grads, run_distributed
from tests.models import VOCAB, tiny_model

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]]


def as_lists(rows):
    return [{k: v.tolist() for k, v in row.items()} for row in rows]


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of every document: a new one starts wherever positions do not increase by 1."""
    starts = [t for t in range(len(position_ids)) if t == 0 or position_ids[t] != position_ids[t - 1] + 1]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def random_docs(seed: int, count: int = 30, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [[rng.randrange(1, VOCAB) for _ in range(rng.choice([0, 1, 2, rng.randint(1, max_len)]))]
            for _ in range(count)]
    docs.append(list(range(1, 3 * 16 + 5)))  # longer than several rows
    return docs


# -- pack_documents -------------------------------------------------------------------------------


def test_pack_documents_exact_output():
    rows = as_lists(pack_documents(DOCS, 5))
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9, 10], "labels": [-100, 7, 8, 9, 10], "position_ids": [0, 1, 2, 3, 4]},
        {"input_ids": [11, 12, 0, 0, 0], "labels": [-100, 12, -100, -100, -100], "position_ids": [0, 1, 0, 1, 2]},
    ]
    masked = as_lists(pack_documents(DOCS, 5, return_attention_mask=True))
    assert masked[:2] == rows[:2] and masked[2] == {**rows[2], "attention_mask": [1, 1, 0, 0, 0]}
    assert as_lists(pack_documents(DOCS, 5, drop_remainder=True)) == rows[:2]
    padded = as_lists(pack_documents(DOCS, 5, pad_id=96))[2]
    assert padded == {"input_ids": [11, 12, 96, 96, 96], "labels": [-100, 12, -100, -100, -100],
                      "position_ids": [0, 1, 0, 1, 2]}
    exact = pack_documents([[1, 2], [3, 4, 5, 6]], 3)  # no remainder: no padding, no mask
    assert [sorted(r) for r in exact] == [["input_ids", "labels", "position_ids"]] * 2
    assert all(v.dtype == torch.long and v.shape == (5,) for row in pack_documents(DOCS, 5) for v in row.values())


def test_long_document_is_split_into_documents():
    rows = as_lists(pack_documents([list(range(10, 22))], 5))
    assert [r["input_ids"] for r in rows] == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 0, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 4]] * 2 + [[0, 1, 0, 1, 2]]
    assert [r["labels"][0] for r in rows] == [-100] * 3  # every piece is its own document


def test_inputs_as_tensors_and_errors():
    rows = pack_documents((torch.tensor(d) for d in DOCS), 5)
    assert as_lists(rows) == as_lists(pack_documents(DOCS, 5))
    assert pack_documents([[], []], 4) == []
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(DOCS, 0)
    with pytest.raises(ValueError, match="1D"):
        pack_documents([torch.ones(2, 2, dtype=torch.long)], 4)


@pytest.mark.parametrize("seed,seq_len", [(0, 16), (1, 7), (2, 1), (3, 64)])
def test_no_shifted_target_crosses_a_document(seed, seq_len):
    docs = random_docs(seed)
    rows = pack_documents(docs, seq_len, return_attention_mask=True)
    real_tokens, valid_targets = [], 0
    for row in as_lists(rows):
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        real = row.get("attention_mask", [1] * seq_len)
        assert len(ids) == len(labels) == len(pos) == seq_len
        doc = [i for i, (lo, hi) in enumerate(segments(pos)) for _ in range(lo, hi)]
        for lo, hi in segments(pos):
            assert pos[lo:hi] == list(range(hi - lo))  # positions restart at every document
            assert len(set(real[lo:hi])) == 1  # padding never shares a document with real tokens
        shift = labels[1:] + [-100]  # HF's shift: position t predicts labels[t + 1]
        for t, target in enumerate(shift):
            if target != -100:
                assert doc[t] == doc[t + 1] and real[t] and real[t + 1] and target == ids[t + 1]
                valid_targets += 1
        real_tokens += [tok for tok, r in zip(ids, real) if r]
    assert real_tokens == [tok for d in docs for tok in d]  # order kept, nothing lost
    # Every target inside a document piece is kept: (piece length - 1) per piece.
    pieces = [hi - lo for row in as_lists(rows) for lo, hi in segments(row["position_ids"])
              if row.get("attention_mask", [1] * seq_len)[lo]]
    assert valid_targets == sum(n - 1 for n in pieces)
    assert sum(1 for row in rows if "attention_mask" in row) == (1 if len(real_tokens) % seq_len else 0)


def test_packed_dataset_batches():
    ds = PackedDataset(DOCS, 5)
    assert len(ds) == 3 and as_lists([ds[i] for i in range(3)]) == as_lists(pack_documents(DOCS, 5))
    loader = torch.utils.data.DataLoader(PackedDataset(DOCS, 5, drop_remainder=True), batch_size=2)
    (batch,) = list(loader)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 5)
    loader = torch.utils.data.DataLoader(PackedDataset(DOCS, 5, return_attention_mask=False), batch_size=3)
    assert next(iter(loader))["position_ids"][2].tolist() == [0, 1, 0, 1, 2]


# -- PackingCollator ------------------------------------------------------------------------------


def test_collator_exact_output():
    samples = [{"input_ids": [1, 2, 3]}, {"input_ids": torch.tensor([4, 5])}, [6]]
    out = PackingCollator()(samples)
    assert as_lists([out])[0] == {"input_ids": [[1, 2, 3, 4, 5, 6]], "labels": [[-100, 2, 3, -100, 5, -100]],
                                  "position_ids": [[0, 1, 2, 0, 1, 0]]}
    out = PackingCollator(pad_to_multiple_of=4, pad_id=7)(samples)
    assert as_lists([out])[0] == {"input_ids": [[1, 2, 3, 4, 5, 6, 7, 7]],
                                  "labels": [[-100, 2, 3, -100, 5, -100, -100, -100]],
                                  "position_ids": [[0, 1, 2, 0, 1, 0, 0, 1]]}
    out = PackingCollator(pad_to_multiple_of=4, return_attention_mask=True)(samples)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    assert "attention_mask" not in PackingCollator(pad_to_multiple_of=3, return_attention_mask=True)(samples)
    with_labels = PackingCollator()([{"input_ids": [1, 2, 3], "labels": [-100, 8, -100]}, {"input_ids": [4, 5]}])
    assert with_labels["labels"].tolist() == [[-100, 8, -100, -100, 5]]


def test_collator_matches_transformers_flattening():
    from transformers import DataCollatorWithFlattening

    samples = [{"input_ids": d} for d in random_docs(5, count=8) if d]
    ours, hf = PackingCollator()(samples), DataCollatorWithFlattening(return_tensors="pt")(samples)
    assert set(ours) == set(hf) and all(torch.equal(ours[k], hf[k]) for k in hf)


def test_collator_errors():
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PackingCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="length"):
        PackingCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="no tokens"):
        PackingCollator()([{"input_ids": []}])


# -- end to end under SP ----------------------------------------------------------------------------


def docs_alone_loss(model, batch) -> torch.Tensor:
    """The non-SP model run on every real document of ``batch`` alone; token mean over all targets.

    Documents are found from the positions and targets are the document's own next tokens, so
    neither the packed labels nor the packed attention enter the reference (the labels only tell
    a padding pseudo-document, all ``-100``, from a real one when the row has no mask).
    """
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        real = batch.get("attention_mask", (batch["labels"] != -100).long())[row]
        for lo, hi in segments(batch["position_ids"][row].tolist()):
            if not real[lo:hi].any() or hi - lo < 2:
                continue
            ids = batch["input_ids"][row:row + 1, lo:hi]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            total = total + F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += hi - lo - 1
    return total / count


def _sp_packed_loss(rank, world):
    sp = world
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (5, 9, 1, 2, 13, 0, 7, 30)]  # 67 tokens
    batches = {
        "collator": PackingCollator(pad_to_multiple_of=sp)([{"input_ids": d} for d in docs]),
        # pack_documents rows of 20: a batch of full rows, the padded last row, and that row with
        # its mask (documents kept apart only on request: packed_documents="split")
        "rows": torch.utils.data.default_collate(pack_documents(docs, 20)[:-1]),
        "last_row": torch.utils.data.default_collate(pack_documents(docs, 20)[-1:]),
        "masked_row": torch.utils.data.default_collate(pack_documents(docs, 20, return_attention_mask=True)[-1:]),
        "odd_row": PackingCollator()([{"input_ids": d} for d in docs[:4]]),  # 17 tokens: not a multiple of sp
    }
    assert batches["collator"]["input_ids"].shape[1] % sp == 0
    assert "attention_mask" not in batches["last_row"] and "attention_mask" in batches["masked_row"]
    assert batches["odd_row"]["input_ids"].shape[1] % sp
    for attn in ("sdpa", "eager"):
        for name, batch in batches.items():
            ref = tiny_model("llama", 4, 2, attn=attn)
            ref_loss = docs_alone_loss(ref, batch)
            ref_loss.backward()
            model = tiny_model("llama", 4, 2, attn=attn)
            handle = apply_ulysses(model, group, packed_documents="split" if name == "masked_row" else "refuse")
            out = model(**shard_batch(batch, rank, sp))
            out.loss.backward()
            tag = f"{name}/{attn}"
            assert_close_rel(out.loss, ref_loss, name=f"{tag} loss")
            assert_sp_grads(model, ref, group, sp, f"{tag} grad")
            handle.remove()
    return True


def test_packed_row_under_sp_equals_documents_alone():
    """A packed row through apply_ulysses (sp=2) gives the token-mean loss of every document run alone."""
    run_distributed(_sp_packed_loss, 2)
