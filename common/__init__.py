"""Plumbing shared by the five domain-forge stages.

Only what two or more stages need lives here: config parsing, the run folder and its manifest,
logging, model loading, data readers, metrics and evaluation. Each stage's algorithm stays in its
own script, so copying a stage means copying that script plus this package.
"""

import os

# Local paths only: on an air-gapped workstation a hub id would retry for ~47 s before failing.
# Set before transformers/datasets are imported; export HF_HUB_OFFLINE=0 to allow the hub.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")

from common.errors import UserError  # noqa: E402

__all__ = ["UserError"]
