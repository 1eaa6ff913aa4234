"""Triton kernels decorated at their first launch instead of at import.

Caller: every kernel file in this package wraps its kernel body in `LazyKernel`.
Why: `triton.jit` decides between the compiler and the CPU interpreter from TRITON_INTERPRET at
decoration time. Deferring it lets CPU tests turn the interpreter on for a single test (the
engine imports `kernels` long before), and keeps one compiled kernel per mode.
"""

from __future__ import annotations

import os

import triton


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class LazyKernel:
    """`kernel[grid](...)` like a `triton.jit` function; decorates `fn` once per mode."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted_by_mode = {}

    def __getitem__(self, grid):
        mode = is_interpreting()
        jitted = self._jitted_by_mode.get(mode)
        if jitted is None:
            jitted = self._jitted_by_mode[mode] = triton.jit(self.fn)
        return jitted[grid]
