"""Value types that several stages' config schemas share. Torch-free, so that composing a config
never imports torch; core.runtime turns these values into torch objects."""

from __future__ import annotations

from enum import StrEnum


class Dtype(StrEnum):   # the one dtype vocabulary of every stage (core.runtime.resolve_dtype)
    auto = "auto"       # bfloat16 on a CUDA device that supports it, else float32
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"
