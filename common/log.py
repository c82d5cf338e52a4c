"""Logging, progress bars, seeding, device/dtype choice and thread count.

One fixed-format line per log step, the same record appended to `metrics.jsonl`:

    step 12 | loss 2.3456 | lr 2.00e-04 | tok/s 512
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

_LOGGER_NAME = "domain_forge"


def get_logger(name: str = _LOGGER_NAME) -> logging.Logger:
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root if name == _LOGGER_NAME else root.getChild(name)


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool | None = None, **kwargs):
    """A tqdm bar on stderr; off when DF_NO_PROGRESS=1 (tests, CI logs)."""
    if disable is None:
        disable = os.environ.get("DF_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True,
                disable=disable, file=sys.stderr, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads(n: int | None) -> None:
    """Intra-op threads for CPU work; None or 0 keeps torch's default."""
    if n:
        torch.set_num_threads(int(n))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from common.errors import UserError

        raise UserError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16, where bf16 autocast about doubles training speed."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32."""
    device = torch.device(device) if isinstance(device, str) else device
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        from common.errors import UserError

        raise UserError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key in ("tok/s", "tokens_per_s"):
            return f"tok/s {value:.0f}"
        return f"{key} {value:.4f}" if math.isfinite(value) and abs(value) < 1e5 else f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsLogger:
    """Prints one fixed-format line per record and appends it as JSON to `metrics.jsonl`."""

    def __init__(self, path: str | Path | None, logger: logging.Logger | None = None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.logger = logger or get_logger()
        self.enabled = enabled
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        # Plain Python numbers: a 0-d tensor would print as "tensor(2.3)", and numpy ints are not JSON.
        values = {k: (v.item() if isinstance(v, (np.generic, torch.Tensor)) else v) for k, v in metrics.items()}
        self.logger.info(" | ".join([f"step {step}"] + [_fmt(k, v) for k, v in values.items()]))
        if self.path:
            record = {"step": step, **values}
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
