"""common.log: the fixed-format step line, metrics.jsonl records, seeding, dtype/device choice."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.log import MetricsLogger, resolve_device, resolve_dtype, seed_everything


def test_step_line_and_metrics_jsonl(tmp_path, caplog):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = logging.getLogger("test_log")
    ml = MetricsLogger(path, logger=logger)
    with caplog.at_level(logging.INFO, logger="test_log"):
        ml.log(1, loss=torch.tensor(2.34567), lr=2e-4, tokens_per_s=512.4, tokens=np.int64(1024))
        ml.log(2, loss=np.float32(1.5), lr=1e-4, tokens_per_s=600.0, tokens=2048)
    assert [r.getMessage() for r in caplog.records] == [
        "step 1 | loss 2.3457 | lr 2.00e-04 | tok/s 512 | tokens 1024",
        "step 2 | loss 1.5000 | lr 1.00e-04 | tok/s 600 | tokens 2048",
    ]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["tokens"] == 1024 and records[1]["loss"] == 1.5
    assert records[0]["loss"] == pytest.approx(2.34567, rel=1e-6)


def test_disabled_logger_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLogger(path, enabled=False).log(1, loss=1.0)
    assert not path.exists()


def test_seed_everything_repeats():
    seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_dtype_and_device():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(UserError, match="dtype must be"):
        resolve_dtype("int3")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
