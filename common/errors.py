"""One exception type for problems the user can fix (bad input, bad flag, bad folder).

Stages raise `UserError("file.jsonl:12: missing field 'text'")`; `common.config.run_main` turns it
into a single `error: ...` line and exit status 2 instead of a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input or configuration; printed as one line, no traceback."""
