"""Uploads staged in a file (a shard's parts past its memory share): the same sums, no trace.

Real files in pytest's tmp_path; the reducer is the one the aggregator runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedgrad.codec import Layout, TensorSpec, byte_view, iter_chunks
from fedgrad.codecs import CastCodec
from fedgrad.errors import InvalidArgument, ResourceExhausted
from fedgrad.server.reducers import StreamingReducer
from fedgrad.server.staging import SpilledChunks, StagedUpload

LAYOUT = Layout(
    [
        TensorSpec("w", torch.float32, (300, 7)),
        TensorSpec("b", torch.float32, (7,)),
        TensorSpec("s", torch.float32, ()),
    ]
)
CHUNK = 512


def _gradients(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen) for s in LAYOUT.specs]


def _stage(tensors: list[torch.Tensor], spill_to: Path | None) -> StagedUpload:
    staged = StagedUpload(CastCodec(LAYOUT.specs, None), CHUNK)
    if spill_to is not None:
        staged.spill(str(spill_to))
    views = [byte_view(t.contiguous()) for t in tensors]
    for tensor, offset, data in iter_chunks(views, LAYOUT, CHUNK):
        staged.add(tensor, offset, data)
    return staged


def _open_files_in(folder: Path) -> int:
    """Files this process holds open in ``folder`` (unlinked ones included)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the fd listdir itself used, closed meanwhile
    return sum(1 for link in links if link.startswith(f"{folder}/"))


def _sum(spill_to: Path | None, workers: int, accumulate: str) -> torch.Tensor:
    reducer = StreamingReducer("weighted-mean", LAYOUT, accumulate, workers=workers)
    for seed, weight in ((1, 3), (2, 5), (3, 1)):
        staged = _stage(_gradients(seed), spill_to)
        assert staged.spilled is (spill_to is not None)
        reducer.add(staged, weight)
        staged.discard()
    reducer.close()
    outputs = [torch.empty(s.shape, dtype=torch.float64) for s in LAYOUT.specs]
    reducer.result_into(outputs, range(len(outputs)))
    return torch.cat([o.reshape(-1) for o in outputs])


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("accumulate", ["float64", "reproducible"])
def test_a_spilled_upload_sums_bitwise_like_one_in_memory(
    tmp_path: Path, workers: int, accumulate: str
) -> None:
    in_memory = _sum(None, workers, accumulate)
    spilled = _sum(tmp_path, workers, accumulate)
    assert torch.equal(in_memory, spilled)
    assert not any(tmp_path.iterdir()), "the spill file has no name: nothing is left behind"


def test_spilled_chunks_read_back_what_was_written_and_keep_nothing_in_memory(
    tmp_path: Path,
) -> None:
    tensors = _gradients(7)
    staged = _stage(tensors, tmp_path)
    chunks = staged.chunks
    assert isinstance(chunks, SpilledChunks)
    assert chunks.file_bytes == staged.nbytes == LAYOUT.total
    data = b"".join(raw[start : start + length] for _, raw, start, length in chunks)
    assert data == b"".join(bytes(byte_view(t.contiguous())) for t in tensors)
    assert [position for position, *_ in chunks] == list(range(0, LAYOUT.total, CHUNK))
    assert _open_files_in(tmp_path) == 1
    staged.discard()
    assert _open_files_in(tmp_path) == 0, "discard closes (and so deletes) the file"
    assert staged.spilled, "a let-go spilled upload still says so (memory counts read it)"


def test_consumed_spilled_chunks_report_their_bytes_once(tmp_path: Path) -> None:
    staged = _stage(_gradients(1), tmp_path)
    consumed: list[int] = []
    staged.on_consumed = consumed.append
    reducer = StreamingReducer("weighted-mean", LAYOUT, "float64")
    reducer.add(staged, 2)
    assert sum(consumed) == LAYOUT.total and max(consumed) <= CHUNK
    staged.consume(0)  # a second report of the same chunk gives nothing back
    assert sum(consumed) == LAYOUT.total
    with pytest.raises(IndexError, match="let go"):
        staged.chunks[0]
    staged.discard()


def test_a_refused_chunk_leaves_the_spilled_upload_as_it_was(tmp_path: Path) -> None:
    staged = StagedUpload(CastCodec(LAYOUT.specs, None), CHUNK)
    staged.spill(str(tmp_path))
    bad = torch.full((CHUNK // 4,), float("nan"))
    with pytest.raises(InvalidArgument):
        staged.add(0, 0, bytes(byte_view(bad)))
    assert staged.nbytes == 0 and len(staged.chunks) == 0
    with pytest.raises(InvalidArgument, match="upload ended after 0"):
        staged.complete()
    staged.discard()


def test_a_spill_folder_that_cannot_be_written_says_which_and_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    staged = StagedUpload(CastCodec(LAYOUT.specs, None), CHUNK)
    with pytest.raises(ResourceExhausted, match=rf"{missing}.*--spill-dir"):
        staged.spill(str(missing))
    assert not staged.spilled, "a failed spill leaves the upload in memory, untouched"


def test_a_full_disk_refuses_the_chunk_and_keeps_what_was_written(tmp_path: Path) -> None:
    chunks = SpilledChunks(str(tmp_path))
    chunks._file.close()
    chunks._file = open("/dev/full", "r+b")  # every write fails with ENOSPC
    with pytest.raises(ResourceExhausted, match="free space"):
        chunks.append((0, b"x" * 64, 0, 64))
    assert len(chunks) == 0 and chunks.file_bytes == 0
    chunks.close()
