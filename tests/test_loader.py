"""The native Parquet loader on small real Parquet folders: layouts, rank split, shuffling, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.batch_plan import RowGroup, rank_ranges, split_streams, stream_rows
from trainer.data import DataError, open_split
from trainer.loader import SplitData, list_parquet_files
from valuerank.config import config_from_dict
from valuerank.hashing import bucketize_ids


def _config(hashing: bool = True, **training) -> object:
    return config_from_dict(
        {
            "actions": [
                {"name": "click", "attribution_window": "1h"},
                {"name": "buy", "attribution_window": "1d"},
            ],
            "sparse_features": [
                {"name": "user", "column": "user_id", "num_embeddings": 100, "hashing": hashing},
                {"name": "tags", "column": "tags", "num_embeddings": 50, "hashing": hashing},
            ],
            "dense_features": [{"column": "price", "normalization": "none"}],
            "split": {"eval_days": 1},
            "training": {"loader_workers": 0, **training},
        }
    )


def _rows(first: int, n: int) -> pa.Table:
    ids = np.arange(first, first + n)
    return pa.table(
        {
            "impression_id": pa.array(ids, pa.int64()),
            "user_id": pa.array(ids % 97, pa.int64()),
            "tags": pa.array([[int(i % 50), int((i + 1) % 50)] if i % 3 else [] for i in ids], pa.list_(pa.int64())),
            "price": pa.array(ids.astype(np.float64)),
            "label_click": pa.array((ids % 2).astype(np.int8)),
            "label_buy": pa.array((ids % 5 == 0).astype(np.int8)),
            "weight": pa.array(np.ones(n)),
        }
    )


def _write(folder: Path, name: str, table: pa.Table, row_group_size: int = 10) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def _ids(batch) -> list[int]:
    return [int(i) for i in batch.row_index.tolist() if i >= 0]


def _epoch_rows(data, epoch: int, rank: int, world_size: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    return [_ids(b) for b in data.train_batches(epoch, rank, world_size, batch_size, seed)]


@pytest.fixture
def split(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 45))
    _write(folder, "part-1.parquet", _rows(45, 37), row_group_size=8)
    return folder


def test_hive_folders_and_hidden_files(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "dt=2024-05-01/part-0.parquet", _rows(0, 10))
    _write(folder, "dt=2024-05-02/part-0.parquet", _rows(10, 10))
    (folder / "_SUCCESS").write_text("")
    (folder / "_manifest.json").write_text("{}")
    (folder / "dt=2024-05-02" / ".part-0.parquet.crc").write_text("x")
    (folder / "_temporary").mkdir()
    (folder / "_temporary" / "part-9.parquet").write_text("not parquet")

    data = SplitData(folder, _config())

    assert [p.parent.name for p in list_parquet_files(folder)] == ["dt=2024-05-01", "dt=2024-05-02"]
    assert data.num_rows == 20
    assert sorted(data.impression_id.tolist()) == list(range(20))


def test_empty_parquet_file_skipped(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 12))
    _write(folder, "part-1.parquet", _rows(0, 0))
    pq.write_table(pa.table({"other": pa.array([], pa.int32())}), folder / "part-2.parquet")

    data = SplitData(folder, _config())
    rows = sorted(i for batch in _epoch_rows(data, 0, 0, 1, 5) for i in batch)

    assert rows == list(range(12))


def test_missing_column_names_file(tmp_path):
    folder = tmp_path / "train"
    table = _rows(0, 5).drop_columns(["tags"])
    _write(folder, "part-0.parquet", table)

    with pytest.raises(DataError, match=r"part-0.parquet: missing column 'tags'"):
        SplitData(folder, _config())


def test_no_rows_rejected(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 0))

    with pytest.raises(DataError, match="no rows"):
        SplitData(folder, _config())


def test_fewer_row_groups_than_ranks_times_workers(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 30), row_group_size=30)
    data = SplitData(folder, _config(loader_workers=2))

    per_rank = [_epoch_rows(data, 0, rank, 3, 4) for rank in range(3)]

    assert [sum(len(b) for b in batches) for batches in per_rank] == [10, 10, 10]
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(30))


def test_equal_batches_on_every_rank(split):
    data = SplitData(split, _config())

    for world_size in (1, 2, 3, 5):
        sizes = [[len(b) for b in _epoch_rows(data, 1, rank, world_size, 4)] for rank in range(world_size)]
        assert all(s == sizes[0] for s in sizes), world_size
        assert len(sizes[0]) == data.num_train_batches(world_size, 4)


def test_ranks_partition_rows(split):
    data = SplitData(split, _config())

    rows = [i for rank in range(3) for b in _epoch_rows(data, 0, rank, 3, 4) for i in b]

    assert len(rows) == len(set(rows))
    assert len(rows) == data.num_rows // 3 * 3


def test_last_partial_batch(split):
    data = SplitData(split, _config())

    sizes = [len(b) for b in _epoch_rows(data, 0, 0, 1, 10)]

    assert sizes == [10] * 8 + [2]


def test_eval_counts_every_row_once(split):
    data = SplitData(split, _config(loader_workers=2))

    for world_size in (1, 2, 3, 7):
        seen = []
        steps = []
        sizes = []
        for rank in range(world_size):
            batches = list(data.eval_batches(rank, world_size, 5))
            steps.append(len(batches))
            sizes.append([b.batch_size for b in batches])
            seen += [i for b in batches for i in _ids(b)]
        assert sorted(seen) == list(range(data.num_rows)), world_size
        assert len(set(steps)) == 1, world_size
        assert all(s == sizes[0] for s in sizes), world_size


def test_eval_padding_rows_are_masked(split):
    data = SplitData(split, _config())

    batches = list(data.eval_batches(6, 7, 5))
    padded = [b for b in batches if (b.row_index < 0).any()]

    assert padded
    assert all((b.label_mask[b.row_index < 0] == 0).all() for b in padded)
    assert all(b.sparse["user"].lengths()[b.row_index < 0].sum() == 0 for b in padded)


def test_order_is_seeded(split):
    data = SplitData(split, _config(shuffle_buffer_rows=20))

    first = _epoch_rows(data, 0, 0, 2, 4, seed=3)
    again = _epoch_rows(data, 0, 0, 2, 4, seed=3)
    next_epoch = _epoch_rows(data, 1, 0, 2, 4, seed=3)

    assert first == again
    assert first != next_epoch


def test_shuffle_off_keeps_file_order(split):
    data = SplitData(split, _config(shuffle=False))

    rows = [i for b in _epoch_rows(data, 0, 0, 1, 6) for i in b]

    assert rows == list(range(data.num_rows))


def test_shuffle_mixes_rows_within_batches(split):
    data = SplitData(split, _config(shuffle_buffer_rows=40))

    batches = _epoch_rows(data, 0, 0, 1, 8)

    assert any(max(b) - min(b) >= 8 for b in batches)


def test_worker_processes_give_same_batches_as_plan(split):
    in_process = SplitData(split, _config(loader_workers=0))
    workers = SplitData(split, _config(loader_workers=2))
    one_stream = [_ids(b) for b in in_process.train_batches(0, 1, 2, 4, seed=5)]

    first = _epoch_rows(workers, 0, 1, 2, 4, seed=5)
    second = _epoch_rows(workers, 0, 1, 2, 4, seed=5)

    assert first == second
    assert sorted(i for b in first for i in b) == sorted(i for b in one_stream for i in b)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_start_batch_matches_uninterrupted_epoch(split, workers):
    data = SplitData(split, _config(loader_workers=workers, shuffle_buffer_rows=16))
    full = _epoch_rows(data, 2, 1, 2, 3, seed=7)

    for start in (1, 4, len(full) - 1, len(full)):
        resumed = [_ids(b) for b in data.train_batches(2, 1, 2, 3, 7, start_batch=start)]
        assert resumed == full[start:], start


def test_worker_streams_balanced_by_rows():
    groups = [RowGroup("f", i, rows, 0) for i, rows in enumerate([50, 7, 30, 1, 12])]

    ranges = rank_ranges(groups, epoch=0, seed=0, rank=0, world_size=2, shuffle=True)
    streams = split_streams(ranges, batch_size=4, streams=3)
    rows = [sum(r.num_rows for r in stream) for stream in streams]

    assert sum(r.num_rows for r in ranges) == 50
    assert rows == stream_rows(50, 4, 3)
    assert max(rows) - min(rows) <= 4


def test_stream_rows_follow_round_robin():
    assert stream_rows(50, 4, 3) == [18, 16, 16]
    assert stream_rows(3, 4, 3) == [3, 0, 0]


def test_null_list_entry_has_length_zero(tmp_path):
    folder = tmp_path / "train"
    table = _rows(0, 4).set_column(2, "tags", pa.array([[1, 2], None, [], [None, 3]], pa.list_(pa.int64())))
    _write(folder, "part-0.parquet", table)
    data = SplitData(folder, _config())

    batch = data.make_batch(np.arange(4))

    assert batch.sparse["tags"].lengths().tolist() == [2, 0, 0, 1]


def test_column_all_null_in_one_row_group(tmp_path):
    folder = tmp_path / "train"
    table = _rows(0, 20)
    nulls = [None] * 10 + list(range(10))
    table = table.set_column(1, "user_id", pa.array(nulls, pa.int64()))
    table = table.set_column(2, "tags", pa.array([None] * 10 + [[1]] * 10, pa.list_(pa.int64())))
    table = table.set_column(3, "price", pa.array([None] * 10 + [1.0] * 10, pa.float64()))
    table = table.set_column(5, "label_buy", pa.array([None] * 10 + [1] * 10, pa.int8()))
    _write(folder, "part-0.parquet", table, row_group_size=10)
    data = SplitData(folder, _config(shuffle=False))

    batch = next(data.train_batches(0, 0, 1, 20, 0))

    assert batch.sparse["user"].lengths().tolist() == [0] * 10 + [1] * 10
    assert batch.sparse["tags"].lengths().tolist() == [0] * 10 + [1] * 10
    assert batch.dense[:10].abs().sum() == 0
    assert batch.label_mask[:, 1].tolist() == [0.0] * 10 + [1.0] * 10


def test_null_typed_column_in_one_file(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 6))
    null_file = _rows(6, 4).set_column(2, "tags", pa.nulls(4))
    _write(folder, "part-1.parquet", null_file)
    data = SplitData(folder, _config(shuffle=False))

    batch = next(data.train_batches(0, 0, 1, 10, 0))

    assert batch.sparse["tags"].lengths().tolist()[6:] == [0, 0, 0, 0]


def test_large_ids_hashed_into_table(tmp_path):
    folder = tmp_path / "train"
    big = np.array([0, 99, 100, 10**12, 2**62, 5], dtype=np.int64)
    table = _rows(0, 6).set_column(1, "user_id", pa.array(big))
    _write(folder, "part-0.parquet", table)
    cfg = _config(shuffle=False)
    data = SplitData(folder, cfg)

    batch = next(data.train_batches(0, 0, 1, 6, 0))
    values = batch.sparse["user"].values().numpy()

    assert values.tolist() == bucketize_ids(big, cfg.sparse_features[0]).tolist()
    assert (values < 100).all()
    assert len(set(values.tolist())) == 6


def test_large_ids_without_hashing_rejected(tmp_path):
    folder = tmp_path / "train"
    table = _rows(0, 6).set_column(1, "user_id", pa.array([0, 1, 2, 3, 4, 100], pa.int64()))
    _write(folder, "part-0.parquet", table)
    data = SplitData(folder, _config(hashing=False))

    with pytest.raises(DataError, match=r"id 100 is outside \[0, 100\)"):
        list(data.train_batches(0, 0, 1, 6, 0))


def test_int32_and_int64_files_mix(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 5))
    narrow = _rows(5, 5)
    narrow = narrow.set_column(1, "user_id", narrow.column("user_id").cast(pa.int32()))
    _write(folder, "part-1.parquet", narrow)
    data = SplitData(folder, _config(shuffle=False))

    batch = next(data.train_batches(0, 0, 1, 10, 0))

    assert batch.sparse["user"].lengths().tolist() == [1] * 10


def test_batch_contents_match_rows(split):
    cfg = _config(shuffle_buffer_rows=16)
    data = SplitData(split, cfg)
    table = pq.read_table(split)

    for batch in data.train_batches(0, 0, 1, 7, 0):
        rows = batch.row_index.numpy()
        assert np.allclose(batch.dense[:, 0].numpy(), table.column("price").to_numpy()[rows])
        expected_tags = [v for r in rows for v in table.column("tags")[int(r)].as_py()]
        tags = batch.sparse["tags"].values().numpy()
        assert tags.tolist() == bucketize_ids(np.array(expected_tags, dtype=np.int64), cfg.sparse_features[1]).tolist()


def test_standard_normalisation_uses_split_stats(tmp_path):
    folder = tmp_path / "train"
    _write(folder, "part-0.parquet", _rows(0, 10))
    cfg = _config()
    cfg.dense_features[0].normalization = "standard"

    data = SplitData(folder, cfg)

    assert data.dense_stats.mean["price"] == pytest.approx(4.5)
    assert data.dense_stats.std["price"] == pytest.approx(np.arange(10).std())


def test_open_split_native_by_default(split):
    assert isinstance(open_split(split, _config()), SplitData)


def test_loader_settings_validated():
    from valuerank.config import ConfigError

    with pytest.raises(ConfigError, match="training.loader_workers: must be >= 0"):
        _config(loader_workers=-1)
    with pytest.raises(ConfigError, match="training.prefetch_batches: must be positive"):
        _config(prefetch_batches=0)
    with pytest.raises(ConfigError, match="training.reader: invalid value 'arrow'"):
        _config(reader="arrow")


def test_worker_order_is_round_robin_of_streams(split):
    from trainer.batch_plan import stream_seed
    from trainer.loader import StreamPlan, iterate_stream

    data = SplitData(split, _config(loader_workers=2, shuffle_buffer_rows=16))
    streams = split_streams(rank_ranges(data.groups, 0, 5, 1, 2, True), 4, 2)
    plans = [StreamPlan(tuple(s), tuple(stream_seed(5, 0, 1, i)), 0, 16) for i, s in enumerate(streams)]
    iterators = [iterate_stream(plan, data.reader, 4) for plan in plans]
    expected = [next(iterators[j % 2])["row_index"].tolist() for j in range(data.num_train_batches(2, 4))]

    assert _epoch_rows(data, 0, 1, 2, 4, seed=5) == expected
