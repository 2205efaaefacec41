"""A description of the hardware the numbers come from."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from lpt.benchmarking.schema import Hardware


def cpu_name() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def hardware(device: str, threads: int = 0) -> Hardware:
    import torch

    dev = torch.device(device)
    info: Hardware = {
        "device": str(dev),
        "device_name": cpu_name(),
        "device_memory_bytes": None,
        "compute_capability": None,
        "cuda": None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": int(threads) if threads > 0 else torch.get_num_threads(),
        "memory_bytes": host_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device_name"] = props.name
        info["device_memory_bytes"] = int(props.total_memory)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
    return info
