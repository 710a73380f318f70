"""grass_ops.cuda._launch: the device guard, row chunks within the grid-y limit, the AOT vocabulary."""
import contextlib

import torch

from grass_ops.cuda import _launch


def test_device_guard_selects_the_tensors_cuda_device():
    guard = _launch.device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_row_chunks_fit_the_grid_and_start_on_aligned_rows():
    rows_per_program = 16
    chunks = list(_launch.row_chunks(3_000_000, rows_per_program))
    assert chunks[0][0] == 0 and chunks[-1][1] == 3_000_000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(-(-(stop - start) // rows_per_program) <= _launch.MAX_GRID_Y for start, stop in chunks)
    assert all(start % 16 == 0 for start, _ in chunks) and len(chunks) == 3
    assert list(_launch.row_chunks(0, 16)) == []


def test_one_at_a_time_covers_each_alternative_once():
    labels = [label for label, _ in _launch.one_at_a_time({"a": 1, "b": 2}, {"a": [3, 4], "b": [5]})]
    assert labels == ["base", "a=3", "a=4", "b=5"]
