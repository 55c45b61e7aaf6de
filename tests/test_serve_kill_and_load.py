"""``hbird serve`` as a real process on localhost: killed mid-change, and under load.

Both start ``python -m hbird serve`` in a subprocess on a free port (slow: the process
imports torch and the app; a few seconds alone, much longer on a loaded machine).
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hbird

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow
SRC = str(Path(hbird.__file__).resolve().parents[1])
STARTUP_SECONDS = 180  # importing torch on a machine shared with other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """``hbird serve ARGS`` on a free port; returns the process and its base URL once the
    API answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hbird", "serve", *args, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"hbird serve exited with {process.returncode}: {log.read_text()}")
        try:
            httpx.get(f"{url}/api/workspaces", timeout=2)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"hbird serve did not answer within {STARTUP_SECONDS} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_masks(state: Path) -> dict[str, bytes]:
    """The demo folder's own masks, as uploads (the demo writes them beside its images)."""
    masks = state / "demo-data" / "masks"
    return {f"{p.stem}.png": mask_png(np.asarray(Image.open(p))) for p in sorted(masks.iterdir())}


def test_a_server_killed_during_a_prompt_add_resumes_at_the_last_confirmed_change(tmp_path):
    """SIGKILL while one client adds prompt images back to back (after one prediction has
    built the predictor, each add encodes its image and grows the bank, so the server is
    busy inside a change almost all the time); a restart with the same
    --state holds every confirmed add, plus at most the one in flight (it may have reached
    its commit point before the kill), each with the mask that was uploaded."""
    state = tmp_path / "state"
    server, url = start_server(["--demo", "--state", str(state)], tmp_path / "first.log")
    uploads = demo_masks(state)
    names = list(uploads)
    confirmed: list[list[str]] = []
    in_flight: list[str] = []
    stop_adding = threading.Event()

    def add_back_to_back():
        with httpx.Client(base_url=url, timeout=60) as client:
            for name in names:
                if stop_adding.is_set():
                    return
                in_flight[:] = [name]
                try:
                    r = client.post(
                        f"/api/workspaces/demo/prompt/{name}", files={"mask": uploads[name]}
                    )
                    if len(confirmed) == 1:  # build the predictor: later adds encode and grow it
                        client.get(f"/api/workspaces/demo/prediction/{names[-1]}.png")
                except httpx.TransportError:
                    return  # the server died under this request
                assert r.status_code == 200, r.text
                confirmed.append(r.json())

    try:
        adder = threading.Thread(target=add_back_to_back)
        adder.start()
        while len(confirmed) < 3 and adder.is_alive():
            time.sleep(0.01)
        time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(20)
        stop_adding.set()
        adder.join(60)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(confirmed) >= 3 and confirmed[-1] == names[: len(confirmed)]
    last = confirmed[-1]
    record = json.loads((state / "demo" / "workspace.json").read_text())  # never half-written
    assert record["prompt"] in (last, last + in_flight), (record["prompt"], last, in_flight)
    print(
        f"killed after {len(last)} confirmed adds; in flight {in_flight}, on disk: {record['prompt'][len(last) :]}"
    )

    server, url = start_server(["--demo", "--state", str(state)], tmp_path / "second.log")
    try:
        resumed = httpx.get(f"{url}/api/workspaces/demo", timeout=60).json()
        assert resumed["prompt"] == record["prompt"]
        for name in resumed["prompt"]:
            kept = state / "demo" / "masks" / f"{Path(name).stem}.png"
            assert np.array_equal(
                np.asarray(Image.open(kept)), np.asarray(Image.open(io.BytesIO(uploads[name])))
            )
        r = httpx.get(f"{url}/api/workspaces/demo/prediction/{names[-1]}.png", timeout=120)
        assert r.status_code == 200  # the resumed prompt predicts
    finally:
        stop(server)


def test_eight_clients_200_mixed_requests_lose_no_confirmed_change(tmp_path, capsys):
    """8 threads send 200 requests in all to one workspace (a quarter adds, each of its
    own image; the rest predictions of random images). Every request succeeds, the run
    is bounded in time, and the final workspace holds exactly the confirmed adds (none
    lost to a concurrent write, none doubled). p50/p95 latencies are printed."""
    from hbird.data.synthetic import make_scenes, write_scene_folder

    folder = write_scene_folder(
        tmp_path / "photos", make_scenes(60, seed=1, size=(64, 64)), with_depth=False
    )
    masks = {
        p.name: mask_png(np.asarray(Image.open(p))) for p in sorted((folder / "masks").iterdir())
    }
    names = sorted(masks)
    settings = ["--encoder", "test_vit", "--image-size", "64", "--index", "exact"]
    server, url = start_server(
        [
            "--images",
            str(folder / "images"),
            "--state",
            str(tmp_path / "state"),
            "--classes",
            "bg,a,b,c",
            *settings,
        ],
        tmp_path / "server.log",
    )
    clients, total, adds_per_client = 8, 200, 6
    latencies: dict[str, list[float]] = {"add": [], "predict": []}
    confirmed: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_run(c: int) -> None:
        rng = np.random.default_rng(c)
        mine = names[c * adds_per_client : (c + 1) * adds_per_client]
        kinds = ["add"] * len(mine) + ["predict"] * (total // clients - len(mine))
        rng.shuffle(kinds)
        kinds.remove("add")
        kinds.insert(0, "add")  # the prompt is never empty when a prediction comes
        with httpx.Client(base_url=url, timeout=120) as client:
            for kind in kinds:
                start = time.perf_counter()
                if kind == "add":
                    name = mine.pop()
                    r = client.post(f"/api/workspaces/w/prompt/{name}", files={"mask": masks[name]})
                else:  # after this client's own first add: never an empty prompt
                    r = client.get(
                        f"/api/workspaces/w/overlay/{names[rng.integers(len(names))]}.png"
                    )
                elapsed = time.perf_counter() - start
                with lock:
                    latencies[kind].append(elapsed)
                    if r.status_code != 200:
                        errors.append(f"{kind} {r.status_code} {r.text[:200]}")
                    elif kind == "add":
                        confirmed.append(name)

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=client_run, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - started
        final = httpx.get(f"{url}/api/workspaces/w", timeout=60).json()["prompt"]
    finally:
        stop(server)
    done = sum(len(v) for v in latencies.values())
    assert not errors, errors[:5]
    assert done == total and wall < 600
    assert len(final) == len(set(final)) and sorted(final) == sorted(confirmed)
    assert len(confirmed) == clients * adds_per_client
    with capsys.disabled():
        for kind, values in latencies.items():
            p50, p95 = np.percentile(values, [50, 95])
            print(
                f"\nload test {kind}: {len(values)} requests, p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
            )
        print(f"load test: {total} requests from {clients} clients in {wall:.1f} s")
