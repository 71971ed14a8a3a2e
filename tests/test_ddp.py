"""Under DDP the patch queue shards subjects per process (no subject seen by two ranks per epoch)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixpriv.data.datamodule import MixprivDataModule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect_subjects(rank: int, world_size: int, port: int, folder: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        datamodule = MixprivDataModule(folder, patch_size=8, batch_size=1, samples_per_volume=1, queue_length=2,
                                       validate_files=False)
        datamodule.setup("fit")
        datamodule.set_epoch(0)
        queue = datamodule.train_dataloader().dataset
        out[rank] = sorted(str(case_id) for case_id in (queue[i]["case_id"] for i in range(len(queue))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_queue_shards_subjects_across_two_processes(tmp_path):
    from conftest import write_nnunet_folder

    # 5 cases -> 4 train (even, so DistributedSampler pads nothing) + 1 val.
    folder = write_nnunet_folder(tmp_path / "ds", n_train=5, n_test=1)
    manager = mp.Manager()
    out = manager.dict()
    port = _free_port()
    mp.start_processes(_collect_subjects, args=(2, port, str(folder), out), nprocs=2, start_method="spawn")
    datamodule = MixprivDataModule(str(folder), validate_files=False)
    datamodule.setup("fit")
    all_train = sorted(case.case_id for case in datamodule.folder.cases("train"))
    assert set(out[0]).isdisjoint(out[1])
    assert sorted(out[0] + out[1]) == all_train
    assert torch.distributed.is_available()
