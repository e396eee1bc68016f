"""Length-bucketed batching, padding, DDP slices, resume position, and the DataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nmt.config import Params
from nmt.data.datamodule import (
    BucketBatchSampler,
    PairsDataset,
    TranslationDataModule,
    bleu_subset,
    cut_batches,
    epoch_plan,
    lengths_of,
    pad_sources,
    pad_targets,
    padding_share,
)
from nmt.data.vectorize import Ragged, SplitData, Texts, load_split
from nmt.specials import BOS_ID, EOS_ID, PAD_ID

BUDGET, MAX_SENT = 600, 64


def _lengths(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tatoeba-like lengths (tokens incl. EOS): mostly short, a long tail."""
    rng = np.random.default_rng(seed)
    src = np.clip(rng.lognormal(2.0, 0.45, n).astype(np.int64), 1, 60) + 1
    trg = np.clip((src * rng.normal(1.15, 0.2, n)).astype(np.int64), 1, 60) + 1
    return src, trg


def _sampler(seed: int = 1, rank: int = 0, world: int = 1, **kw: object) -> BucketBatchSampler:
    src, trg = _lengths()
    return BucketBatchSampler(src, trg, batch_tokens=BUDGET, max_sentences=MAX_SENT, seed=seed,
                              shuffle=True, rank=rank, world=world, **kw)  # type: ignore[arg-type]


def test_every_batch_fits_the_token_budget_and_covers_each_pair_once() -> None:
    sampler = _sampler()
    batches = sampler.global_batches(0)
    for rows in batches:
        assert len(rows) <= MAX_SENT
        assert len(rows) * sampler.trg_len[rows].max() <= BUDGET
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(sampler.src_len)))


def test_cut_batches_gives_an_overlong_pair_its_own_batch() -> None:
    trg = np.array([3, 50, 3, 3])
    batches = cut_batches(np.array([0, 2, 3, 1]), trg, batch_tokens=20, max_sentences=8)
    assert [b.tolist() for b in batches] == [[0, 2, 3], [1]]


def test_padding_share_is_small() -> None:
    share = padding_share(_sampler())
    assert share["trg"] < 0.05 and share["src"] < 0.25, share


def test_batches_are_seeded_and_reshuffled_per_epoch() -> None:
    a, b = _sampler(seed=1), _sampler(seed=1)
    first = [x.tolist() for x in a.global_batches(0)]
    assert first == [x.tolist() for x in b.global_batches(0)]
    assert first != [x.tolist() for x in a.global_batches(1)]
    assert first != [x.tolist() for x in _sampler(seed=2).global_batches(0)]


def test_ddp_rank_slices_are_disjoint_and_equally_long() -> None:
    world = 3
    slices = [list(_sampler(rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in slices}) == 1
    seen = [i for s in slices for rows in s for i in rows.tolist()]
    assert len(seen) == len(set(seen))


def test_epochs_keep_the_first_epoch_batch_count() -> None:
    sampler = _sampler()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert len(list(sampler)) == len(sampler)


def test_resume_skips_the_batches_already_trained() -> None:
    full = list(_sampler())
    resumed = _sampler(num_batches=len(full))
    resumed.load_state_dict({"epoch": 0, "batches_done": 5})
    resumed.set_epoch(0)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in full[5:]]
    at_end = _sampler(num_batches=len(full))
    at_end.load_state_dict({"epoch": 0, "batches_done": len(full)})
    assert at_end.epoch == 1
    next_epoch = _sampler()
    next_epoch.set_epoch(1)
    assert [b.tolist() for b in at_end] == [b.tolist() for b in next_epoch]


@pytest.mark.parametrize(("batches", "limit", "every", "expected"), [
    (600, 1.0, 1000, (600, 600)),  # epoch shorter than the interval: validate at epoch end
    (3000, 1.0, 1000, (3000, 1000)),
    (3001, 1.0, 1000, (3000, 1000)),
    (100, 0.5, 1000, (50, 50)),  # fraction
    (100, 7.0, 3, (6, 3)),  # count
])
def test_epoch_plan(batches: int, limit: float, every: int, expected: tuple[int, int]) -> None:
    per_epoch, interval = epoch_plan(batches, limit, every)
    assert (per_epoch, interval) == expected
    assert per_epoch % interval == 0 and interval <= every


def test_epoch_plan_trims_few_batches() -> None:
    for batches in range(50, 400, 7):
        per_epoch, interval = epoch_plan(batches, 1.0, 40)
        assert per_epoch % interval == 0 and 32 <= interval <= 40
        assert batches - per_epoch < interval


def test_padding_helpers_add_bos_eos() -> None:
    src, lengths = pad_sources([np.array([5, 6, 7]), np.array([8])])
    assert src.tolist() == [[5, 6, 7, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [4, 2]
    trg = pad_targets([np.array([9]), np.array([10, 11])])
    assert trg.tolist() == [[BOS_ID, 9, EOS_ID, PAD_ID], [BOS_ID, 10, 11, EOS_ID]]


def test_dataset_builds_a_batch_from_index_rows() -> None:
    split = SplitData(src=[np.array([4, 5]), np.array([6])], trg=[np.array([7]), np.array([8, 9])],
                      en=["a", "b"], fr=["x", "y"], group=np.array([0, 1]))
    batch = PairsDataset(split)[np.array([1, 0])]
    assert batch.n_tokens == (2 + 1) + (1 + 1)
    assert batch.trg_in.tolist() == [[BOS_ID, 8, 9], [BOS_ID, 7, EOS_ID]]
    assert batch.trg_out.tolist() == [[8, 9, EOS_ID], [7, EOS_ID, PAD_ID]]


def test_bleu_subset_takes_distinct_sources_with_all_references() -> None:
    split = SplitData(src=[np.array([i + 4]) for i in range(5)], trg=[np.array([4])] * 5,
                      en=["a", "a", "b", "c", "c"], fr=["a1", "a2", "b1", "c1", "c2"],
                      group=np.array([0, 0, 1, 2, 2]))
    subset = bleu_subset(split, 10, seed=3)
    assert sorted(subset.sources) == ["a", "b", "c"]
    refs = dict(zip(subset.sources, subset.references, strict=True))
    assert refs == {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1", "c2"]}
    assert bleu_subset(split, 2, seed=3) == bleu_subset(split, 2, seed=3)
    assert len(bleu_subset(split, 2, seed=3).sources) == 2


def test_datamodule_on_tiny_data(tiny_data: dict[str, Path], tiny_params: Params) -> None:
    dm = TranslationDataModule(tiny_data["processed"], tiny_params.train, tiny_params.seed)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == dm.batches_per_epoch == len(loader)
    assert dm.batches_per_epoch % dm.val_interval == 0
    assert all(b.trg_out.shape[0] * b.trg_out.shape[1] <= tiny_params.train.batch_tokens
               or b.trg_out.shape[0] == 1 for b in batches)
    valid = load_split(tiny_data["processed"], "valid")
    seen = sum(b.src.shape[0] for b in dm.val_dataloader())
    assert seen == len(valid)


def _lists_split(processed: Path, split: str) -> SplitData:
    """A split as the data module held it before `Ragged`: one numpy array and str per row."""
    table = pq.read_table(processed / f"{split}.parquet")

    def rows(name: str) -> list[np.ndarray]:
        col = table.column(name).combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False).astype(np.int32)
        return np.split(flat, col.offsets.to_numpy()[1:-1])

    return SplitData(src=rows("src"), trg=rows("trg"), en=table.column("en").to_pylist(),
                     fr=table.column("fr").to_pylist(),
                     group=table.column("group").to_numpy().astype(np.int64))


def test_flat_split_gives_the_same_batches_as_per_row_arrays(tiny_data: dict[str, Path],
                                                             tiny_params: Params) -> None:
    flat = load_split(tiny_data["processed"], "train")
    assert isinstance(flat.src, Ragged) and isinstance(flat.en, Texts)  # no per-row objects
    lists = _lists_split(tiny_data["processed"], "train")
    assert list(flat.en) == lists.en and flat.fr[3] == lists.fr[3]
    cfg = tiny_params.train
    samplers = [BucketBatchSampler(lengths_of(s.src, 1), lengths_of(s.trg, 1),
                                   batch_tokens=cfg.batch_tokens,
                                   max_sentences=cfg.max_batch_sentences, seed=5, shuffle=True)
                for s in (flat, lists)]
    for epoch in (0, 1):
        runs = [[PairsDataset(s)[rows] for rows in sampler.global_batches(epoch)]
                for s, sampler in zip((flat, lists), samplers, strict=True)]
        assert len(runs[0]) == len(runs[1]) > 1
        for new, old in zip(*runs, strict=True):
            assert new.src.equal(old.src) and new.trg.equal(old.trg)
            assert new.src_lengths.equal(old.src_lengths) and new.n_tokens == old.n_tokens
    valid = load_split(tiny_data["processed"], "valid")
    new, old = bleu_subset(valid, 20, 1), bleu_subset(_lists_split(tiny_data["processed"],
                                                                   "valid"), 20, 1)
    assert (new.sources, new.references) == (old.sources, old.references)
    assert [s.tolist() for s in new.src] == [s.tolist() for s in old.src]


def test_ragged_rows_select_and_arrow_round_trip() -> None:
    seqs = Ragged.from_lengths(np.arange(6, dtype=np.int32), np.array([2, 0, 3, 1]))
    assert [s.tolist() for s in seqs] == [[0, 1], [], [2, 3, 4], [5]]
    assert seqs[2].tolist() == [2, 3, 4] and len(seqs) == 4
    kept = seqs.select(np.array([True, False, False, True]))
    assert [s.tolist() for s in kept] == [[0, 1], [5]]
    back = Ragged.from_arrow(pa.chunked_array([seqs.to_arrow().slice(1)]))
    assert [s.tolist() for s in back] == [[], [2, 3, 4], [5]]
    assert lengths_of(seqs, 1).tolist() == [3, 1, 4, 2]
