"""Plumbing shared by the five domain-forge stages.

Only what two or more stages need lives here: config parsing, the run folder and its manifest,
logging, model loading, data readers, metrics and evaluation. Each stage's algorithm stays in its
own script, so copying a stage means copying that script plus this package.
"""

from common.errors import UserError

__all__ = ["UserError"]
