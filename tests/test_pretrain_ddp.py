"""Two CPU processes (gloo) with half the global batch each ≡ one process with all of it.

Both runs go through the whole trainer (data sampler, DDP, global batch norm, queues
gathered across processes, EMA, checkpoints); the losses and gradient norms logged at
every step and the exported weights must agree.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options

FAST = ["hummingbird", "local_global"]
SLOW = ["hummingbird++", "ibot", "co2"]
STEPS = 3


@contextmanager
def default_float64() -> Iterator[None]:
    """torch's default dtype float64 inside the block. Two runs compared in float64 keep
    their rounding noise far below AdamW's eps, so their updates agree to many digits (in
    float32 Adam turns noise on near-zero gradients into ±lr steps)."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def run_all(root: Path, objectives: list[str], dist=None) -> None:
    """Train each objective for a few steps; write metrics and checkpoints under ``root``."""
    with default_float64():
        _run_all(root, objectives, dist)


def _run_all(root: Path, objectives: list[str], dist=None) -> None:
    from hbird.pretrain import PretrainConfig, Trainer
    from hbird.pretrain.data import SyntheticImages

    images = SyntheticImages(n=16, seed=5, size=48)
    for name in objectives:
        # small queues so they wrap around within the run
        overrides = {"memory_size": 12} if name.startswith("hummingbird") else {}
        if name == "co2":
            overrides = {"queue_size": 20}
        config = PretrainConfig(
            objective=name,
            objective_options=tiny_options(name, **overrides),
            arch=TINY_ARCH,
            model_kwargs=TINY_VIT_KWARGS,
            steps=STEPS,
            batch_size=8,
            crop_size=32,
            warmup_steps=1,
            num_workers=0,
            log_every=1,
            out=str(root / name),
        )
        Trainer(config, dist=dist, images=images, log=lambda _: None).fit()


def _worker(rank: int, world_size: int, init_file: str, run, args: tuple) -> None:
    from hbird.pretrain.distributed import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed(
        device="cpu",
        backend="gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
    )
    try:
        run(*args, dist=info)
    finally:
        cleanup_distributed()


def run_in_two_processes(init_file: Path, run, *args) -> None:
    """``run(*args, dist=...)`` in two CPU processes joined by gloo through ``init_file``
    (``run`` is a module-level function of an importable module, for ``mp.spawn``)."""
    mp.spawn(_worker, args=(2, str(init_file), run, args), nprocs=2, join=True)


def launch(root: Path, objectives: list[str]) -> Path:
    run_all(root / "single", objectives)
    run_in_two_processes(root / "init", run_all, root / "double", objectives)
    return root


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp_fast"), FAST)


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp_slow"), SLOW)


def read_records(folder: Path) -> list[dict[str, float]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "step_time"} for x in lines]


def check_same_run(
    runs: Path, name: str, weights: str = "checkpoint.safetensors", steps: int = STEPS
) -> None:
    """``runs/single/name`` and ``runs/double/name`` logged the same ``steps`` records and
    wrote the same ``weights``."""
    single = read_records(runs / "single" / name)
    double = read_records(runs / "double" / name)
    assert len(single) == len(double) == steps
    for a, b in zip(single, double):
        assert a.keys() == b.keys() and {"loss", "grad_norm"} <= a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-9), (a["step"], key)
    weights_a = load_file(str(runs / "single" / name / weights))
    weights_b = load_file(str(runs / "double" / name / weights))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAST)
def test_two_processes_match_one_process(fast_runs, name):
    check_same_run(fast_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_two_processes_match_one_process_other_objectives(slow_runs, name):
    check_same_run(slow_runs, name)


def test_only_the_main_process_writes(fast_runs):
    assert sorted(os.listdir(fast_runs / "double" / "hummingbird")) == [
        "checkpoint.safetensors",
        "config.json",
        "metrics.jsonl",
        "trainer_state.safetensors",
    ]
