"""Shared test fixtures: real tar shards of real images, and launching the real trainer."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import webdataset as wds

from largemim.data.manifest import Manifest, ShardInfo

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "fashion_mnist"


def demo_samples(split: str = "train", limit: int | None = None) -> list[dict]:
    """Real Fashion-MNIST samples (PNG bytes + label) from the shards shipped in the repo."""
    out = []
    for shard in sorted((DEMO / split).glob("*.tar")):
        for s in wds.tarfile_samples([{"url": str(shard)}]):
            out.append({"__key__": s["__key__"], "png": s["png"], "cls": s["cls"]})
            if limit and len(out) >= limit:
                return out
    return out


def write_shards(folder: Path, samples: list[dict], sizes: list[int], prefix: str = "shard") -> str:
    """Write ``samples`` into shards of the given sizes plus a manifest; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest, i = Manifest(), 0
    for n, size in enumerate(sizes):
        name = f"{prefix}-{n:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for s in samples[i : i + size]:
                sink.write(s)
        manifest.shards.append(ShardInfo(name, size))
        i += size
    manifest.save(folder)
    return str(folder / f"{prefix}-{{{0:06d}..{len(sizes) - 1:06d}}}.tar")


@contextlib.contextmanager
def served(root: Path, before_get=None):
    """A local web server for ``root``'s files: remote shards over real HTTP (curl). ``before_get(handler)``
    is called first on each GET; when it returns True it has answered the request itself."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - the http.server hook's name
            if before_get is None or not before_get(self):
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory) -> str:
    """640 real images in 5 shards of uneven size."""
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(folder, demo_samples("train", 640), [200, 120, 150, 90, 80])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = [
    "model.size=nano",
    "model.img_size=16",
    "model.patch_size=4",
    "model.decoder_dim=32",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "train.micro_batch=16",
    "train.warmup_steps=2",
    "data.workers=0",
    "data.shuffle_buffer=50",
    "log.every_steps=1",
    "log.image_every_steps=0",
    "log.tensorboard=false",
    "eval.train_shards=",
    "eval.test_shards=",
    "optim.base_lr=2e-3",
]


def trainer_cmd(nproc: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "largemim.train", "--config", str(REPO / "largemim/recipes/mae_tiny_cpu.yaml"), *overrides,
    ]  # fmt: skip


def trainer_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_trainer(run_dir: Path, shards: str, overrides: list[str], nproc: int = 2, timeout: int = 300):
    cmd = trainer_cmd(nproc, [*TINY, f"data.shards={shards}", f"run.dir={run_dir}", *overrides])
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict[int, dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
