"""The accelerators we know: peak matmul FLOP/s (bf16, f32), HBM size and bandwidth, per chip.

One table, read by `clip_jax.aot` (the roofline of a slice you do not have) and by
`clip_jax.telemetry` (the MFU of the run in progress, looked up from
``jax.devices()[0].device_kind``). Peaks are the vendors' dense figures (no
structured sparsity). "f32" is what an f32 matmul gets under JAX's default
precision: on TPUs one bf16 pass of the MXU (so the bf16 peak), on NVIDIA
Ampere/Hopper TF32 tensor cores. One JAX device is one chip on all of these
(v4/v5p in megacore mode).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str  # regex matched (case-insensitive, whole string) against jax's device_kind
    bf16_flops: float  # peak FLOP/s per chip
    f32_flops: float
    hbm_gib: float
    hbm_bandwidth: float  # bytes/s per chip


# TPUs: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e. NVIDIA: the H100/H200/A100 datasheets.
CHIPS = {
    "v4": Chip("TPU v4", r"TPU v4", 275e12, 275e12, 32, 1200e9),
    "v5e": Chip("TPU v5e", r"TPU v5 ?(lite|e)", 197e12, 197e12, 16, 819e9),
    "v5p": Chip("TPU v5p", r"TPU v5p?", 459e12, 459e12, 95, 2765e9),
    "v6e": Chip("TPU v6e (Trillium)", r"TPU v6 ?(lite|e)?", 918e12, 918e12, 32, 1638e9),
    "h100": Chip("NVIDIA H100 SXM", r"NVIDIA H100( SXM.*| 80GB HBM3)", 989e12, 494.5e12, 80, 3350e9),
    "h100-pcie": Chip("NVIDIA H100 PCIe", r"NVIDIA H100 PCIe", 756e12, 378e12, 80, 2000e9),
    "h200": Chip("NVIDIA H200", r"NVIDIA H200.*", 989e12, 494.5e12, 141, 4800e9),
    "a100": Chip("NVIDIA A100", r"NVIDIA A100.*", 312e12, 156e12, 80, 2039e9),  # HBM: the 80 GB model
}


def chip_for(device_kind: str) -> Chip | None:
    """The table's chip whose pattern matches ``device_kind`` (e.g. "TPU v5 lite"), or None."""
    for chip in CHIPS.values():
        if re.fullmatch(chip.device_kind, device_kind.strip(), re.IGNORECASE):
            return chip
    return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` computing in ``dtype`` ("bfloat16" | "float32"),
    or None for a device the table does not know (a CPU, an unlisted GPU)."""
    chip = chip_for(device_kind)
    if chip is None:
        return None
    return chip.bf16_flops if dtype in ("bfloat16", "float16") else chip.f32_flops
