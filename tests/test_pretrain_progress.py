"""What a pretraining run tells its user: an ETA on each log line, and a worker count the CPU can run."""

import re

import pytest
import torch

from hbird.pretrain import Trainer
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.trainer import format_seconds, process_cores
from test_pretrain_trainer import config as tiny_config


def test_format_seconds():
    cases = {0: "0s", 9.4: "9s", 59.6: "1m00s", 75: "1m15s", 3599: "59m59s", 3725: "1h02m"}
    assert {s: format_seconds(s) for s in cases} == cases


def test_process_cores_is_the_process_share_of_its_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert process_cores() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the machine
    assert process_cores() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert process_cores() == 0  # load in the main process rather than oversubscribe


def test_more_workers_than_cores_are_capped_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    lines = []
    trainer = Trainer(
        tiny_config(tmp_path, num_workers=6),
        images=SyntheticImages(n=8, seed=0, size=32),
        log=lines.append,
    )
    assert trainer.loader.num_workers == 1
    assert any("num_workers 6" in line and "using 1" in line for line in lines)


def test_log_lines_show_the_time_left(tmp_path):
    lines = []
    trainer = Trainer(
        tiny_config(tmp_path, log_every=2),
        images=SyntheticImages(n=8, seed=0, size=32),
        log=lines.append,
    )
    trainer.fit()
    step_lines = [line for line in lines if line.startswith("[hummingbird] step")]
    assert len(step_lines) == 2  # steps 2 and 4
    # step 2 of 4: two steps left at the measured step time
    step_time = float(re.search(r"step_time (\S+)", step_lines[0]).group(1))
    eta = re.search(r"eta (\d+)s$", step_lines[0])
    assert eta is not None and int(eta.group(1)) == pytest.approx(2 * step_time, abs=1)
    assert "eta" not in step_lines[1]  # the last line: nothing left


def test_cpu_training_threads_and_workers_fit_in_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads_while_logging = []
        trainer = Trainer(
            tiny_config(tmp_path),
            images=SyntheticImages(n=8, seed=0, size=32),
            log=lambda line: threads_while_logging.append(torch.get_num_threads()),
        )
        trainer.fit()
        assert threads_while_logging and set(threads_while_logging) == {1}  # 1 core, 0 workers
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
