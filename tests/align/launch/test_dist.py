"""The collectives' single-process identities and the file wait of the ranks other than 0."""

import threading

import pytest
import torch

from align.launch import dist


def test_collectives_are_the_identity_in_one_process():
    t = torch.arange(3.0)
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_gather_object(5) == [5]
    assert torch.equal(dist.all_gather_rows(t), t) and torch.equal(dist.all_reduce_sum(t), t)
    dist.barrier()


def test_wait_for_file_returns_once_rank_0_has_written_it(tmp_path):
    path = tmp_path / "round1" / "kept.json"
    release = threading.Event()

    def rank0():
        release.wait()
        path.parent.mkdir()
        path.write_text("[]")

    writer = threading.Thread(target=rank0)
    writer.start()
    waiter = threading.Thread(target=dist.wait_for_file, args=(path, 0.01))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not path.exists()  # still waiting: nothing is written yet
    release.set()
    waiter.join(timeout=30)
    writer.join()
    assert not waiter.is_alive() and path.read_text() == "[]"


def test_sampling_ranks_refuse_an_in_process_engine():
    from types import SimpleNamespace

    from align.errors import AlignError
    from align.launch import start_sampling_ranks

    with pytest.raises(AlignError, match=r"gatt.train.num_processes=2 needs rollout.in_process=false"):
        start_sampling_ranks("gatt.train.num_processes", 2, SimpleNamespace(engine="vllm", in_process=True))
