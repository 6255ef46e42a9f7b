"""How much memory the KV cache gets, and how many sequences run at once by default.

`--kv-memory` takes a size ("2GB", "512MiB", "800M", a plain number of bytes) or a share of
the memory this process can still take ("25%").  What it can take (`memory_limit`):
    CPU   the smaller of the RAM available now (MemAvailable) and, under `ulimit -v`
          (RLIMIT_AS), the address space left below the limit (the limit minus the process's
          size now: the pool is one allocation, refused at once beyond it);
    CUDA  the device's free memory after the weights are loaded.
The default is a quarter of that, at most 4 GiB on the CPU: enough for SmolLM2's 46 KB a
token to hold ~90K positions, and small enough to leave room for the rest of a shared
machine.  An explicit size beyond the limit is refused with a one-line error.
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
    """Bytes free for new tensors on `device` now (RAM or device memory; see memory_limit)."""
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


def address_space_left() -> int | None:
    """Bytes of address space this process may still map under RLIMIT_AS (ulimit -v); None: no limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    size = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(0, soft - size)


def memory_limit(device: torch.device) -> tuple[int, str]:
    """(bytes a KV pool can take now, what sets that number) on `device`."""
    available = available_memory(device)
    if device.type == "cuda":
        return available, "free device memory"
    left = address_space_left()
    if left is not None and left < available:
        return left, "address space left under ulimit -v"
    return available, "RAM available"


def parse_memory(text: str | int | None, device: torch.device) -> int:
    """A --kv-memory value -> bytes (None: the default share)."""
    return memory_budget(text, device)[0]


def memory_budget(text: str | int | None, device: torch.device) -> tuple[int, str]:
    """A --kv-memory value -> (bytes, how they were chosen: said at start-up)."""
    limit, what = memory_limit(device)
    if text is None:
        budget = int(limit * DEFAULT_SHARE)
        note = f"default: {DEFAULT_SHARE:.0%} of {human(limit)} {what}"
        if device.type != "cuda" and budget > CPU_DEFAULT_CAP:
            budget, note = CPU_DEFAULT_CAP, note + f", at most {human(CPU_DEFAULT_CAP)}"
        return budget, note
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
            return int(limit * number / 100), f"{number:g}% of {human(limit)} {what}"
        value = int(number * UNITS[unit])
    if value <= 0:
        raise Llama3Error(f"--kv-memory {text!r} must be more than 0 bytes")
    if value > limit:
        raise Llama3Error(f"--kv-memory {text!r} ({human(value)}) is more than the {human(limit)} of {what} "
                          "now; give less, or a share such as 25%")
    return value, "--kv-memory"


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
