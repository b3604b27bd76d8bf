"""GPUs a run can be planned for from any machine (memory as `nvidia-smi` reports it)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 ** 2


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    per_node: int = 8  # the HGX/DGX boards these come on


GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 81_559 * MiB),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", 143_771 * MiB),
    "a100-80g": GpuSpec("NVIDIA A100-SXM4-80GB", 81_920 * MiB),
}
