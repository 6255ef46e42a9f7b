"""How much memory the KV cache gets, and how many sequences run at once by default.

`--kv-memory` takes a size ("2GB", "512MiB", "800M", a plain number of bytes) or a share of
the device's memory ("25%").  The default is a quarter of the memory that is available now
(CPU: MemAvailable; CUDA: the free memory after the weights are loaded), at most 4 GiB on
the CPU: enough for SmolLM2's 46 KB a token to hold ~90K positions, and small enough to
leave room for the rest of a shared machine.
"""

from __future__ import annotations

import re

import torch

from llama3.errors import Llama3Error

DEFAULT_SHARE = 0.25
CPU_DEFAULT_CAP = 4 << 30
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
         "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_memory(text: str | int | None, device: torch.device) -> int:
    """A --kv-memory value -> bytes (None: the default share)."""
    if text is None:
        budget = int(available_memory(device) * DEFAULT_SHARE)
        return min(budget, CPU_DEFAULT_CAP) if device.type != "cuda" else budget
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or (unit != "%" and unit not in UNITS):
            raise Llama3Error(f"--kv-memory {text!r} is not a size; use e.g. 2GB, 512MiB or 25% (of free memory)")
        number = float(match.group(1))
        if unit == "%":
            if not 0 < number <= 100:
                raise Llama3Error(f"--kv-memory {text!r}: a share must be in (0, 100]%")
            value = int(available_memory(device) * number / 100)
        else:
            value = int(number * UNITS[unit])
    if value <= 0:
        raise Llama3Error(f"--kv-memory {text!r} must be more than 0 bytes")
    return value


def default_parallel(total_tokens: int, context: int) -> int:
    """Running sequences at once when --parallel is not given: what the budget holds at a
    quarter of the context each, between 1 and 16 (more only slows each stream on a CPU)."""
    return max(1, min(16, total_tokens // max(1, min(context, 8192) // 4)))


def human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""
