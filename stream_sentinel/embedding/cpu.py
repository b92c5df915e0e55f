"""What the CPU can do, read once per process: the embedder picks bf16 by it, the ONNX
backend its quantisation, and both record it with benchmark figures (machines differ).

Its own module so the embedder and the ONNX backend both use it without importing each other.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once per process (model ids are computed on every tick)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
