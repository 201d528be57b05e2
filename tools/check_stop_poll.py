"""Check on a GPU that the trainer's per-step stop check (``StopOnSignal.poll``) does not make the host
wait for the device, where the blocking check it replaced (``agreed``) did.

One process, a one-rank NCCL group (the collective path of a multi-rank run): queue about a second of
matmuls, then time each call on the host and ask whether the device was still busy right after it.

    python tools/check_stop_poll.py            # on a CUDA machine; --device cpu runs it through gloo
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from largemim.signals import StopOnSignal


def busy_work(n: int) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(n):
        a = (a @ a).clamp_(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--matmuls", type=int, default=400, help="8192² bf16 matmuls queued before each call")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    device = torch.device(args.device)
    stopper = StopOnSignal([], device)
    stopper._distributed = lambda: True  # one rank: take the collective path all the same
    stopper.poll()  # the first call blocks by design (a start-up signal stops after step 1)
    for name in ("poll", "agreed"):
        if device.type == "cuda":
            busy_work(args.matmuls)
        t = time.perf_counter()
        result = getattr(stopper, name)()
        host_ms = (time.perf_counter() - t) * 1e3
        busy = device.type == "cuda" and not torch.cuda.current_stream().query()
        print(f"{name}: {host_ms:.1f} ms on the host, returned {result}, device still busy after it: {busy}")
        if device.type == "cuda":
            torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
