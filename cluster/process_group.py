"""torch.distributed among worker actors; the rendezvous address is found through Ray."""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_address() -> tuple[str, int]:
    """Called on rank 0's actor: its node IP and a free port there."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def backend_for(device: str) -> str:
    """gloo on CPU; nccl on GPU (RCCL on ROCm builds of torch)."""
    return "gloo" if device == "cpu" else "nccl"


def join(address: tuple[str, int], rank: int, world_size: int, device: str, timeout_s: float) -> None:
    host, port = address
    dist.init_process_group(backend_for(device), init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
