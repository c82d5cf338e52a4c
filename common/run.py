"""The run folder and each stage's `manifest.json`.

Stages chain through one folder, `runs/<name>/01_corpus/`, `02_cpt/`, `03_sft/`, `04_distill/`,
`05_spec/`. A stage folder is valid only when its `manifest.json` exists with status `complete`;
the manifest is written last and atomically, so an interrupted run never looks finished.

    run = StageRun("02_cpt", cfg.output_dir, cfg, overwrite=cfg.overwrite, resume=cfg.resume)
    upstream = run.add_input("corpus", corpus_dir, upstream=True)   # refuses an incomplete 01_corpus
    ...
    run.finish(outputs={"model": "model/"}, metrics={"ppl_domain_after": 4.9})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, TextIO

from common.errors import UserError

STAGES = ("01_corpus", "02_cpt", "03_sft", "04_distill", "05_spec")
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_PACKAGES = ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes", "accelerate",
             "llama_cpp_python", "evaluate", "jieba", "rjieba", "datasketch", "datatrove", "gguf")


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[TextIO]:
    """Open a temp file beside `path` for writing; on success rename it over `path`, on error remove it.

    Readers never see half a file, and an interrupted write leaves the old file (or nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give the usual umask-based mode so others on a shared box can read.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    return Path(run_dir) / stage


def resolve_output_dir(output_dir: str | None, run_dir: str | None, stage: str) -> Path:
    """`--output_dir` wins; otherwise `<run_dir>/<stage>`; one of them is required."""
    if output_dir:
        return Path(output_dir)
    if run_dir:
        return stage_dir(run_dir, stage)
    raise UserError(f"give --output_dir or --run_dir (the stage then writes to <run_dir>/{stage})")


def resolve_input(explicit: str | None, run_dir: str | None, stage: str, what: str) -> Path:
    """An input named on the command line, else the predecessor stage's folder in the run."""
    if explicit:
        return Path(explicit)
    if run_dir:
        return stage_dir(run_dir, stage)
    raise UserError(f"give --{what} or --run_dir (then it is read from <run_dir>/{stage})")


def load_script(path: str | Path, name: str):
    """Import a stage script by path as module `name` (tests, benchmarks, notebooks).

    Stage scripts start with a digit, so `import` cannot name them. The module is registered in
    sys.modules before it runs: dataclasses look their module up while the class is built, and
    worker processes unpickle its functions by that name. A second call returns the same module.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_upstream(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished upstream stage; refuse a folder whose stage did not complete."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: upstream folder does not exist")
    manifest = load_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST} — the stage that writes it did not finish; rerun it")
    if manifest.get("status") != "complete":
        raise UserError(f"{folder}/{MANIFEST}: status is {manifest.get('status')!r}, not 'complete'")
    return manifest


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageRun:
    """One execution of a stage in its output folder; `finish()` writes the manifest last.

    overwrite: wipe the folder first. resume: keep what is there (the stage picks up its
    checkpoints). Neither: the folder must be empty or absent.
    """

    def __init__(self, stage: str, output_dir: str | Path, cfg: Any = None, *, overwrite: bool = False,
                 resume: bool = False, is_main_process: bool = True):
        self.stage = stage
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.is_main = is_main_process
        self.inputs: dict[str, Any] = {}
        self.started = _now()
        if overwrite and resume:
            raise UserError("--overwrite and --resume exclude each other")
        # Only the main process judges and prepares the folder; other ranks would race with it.
        # A lone config.yaml is what a run that failed before writing anything leaves (bad input,
        # unfinished upstream): the corrected rerun must not need --overwrite for it.
        exists = self.is_main and self.output_dir.exists() and any(
            p.name != CONFIG for p in self.output_dir.iterdir())
        if exists and not (overwrite or resume):
            raise UserError(f"{self.output_dir} is not empty; pass --overwrite to replace it or --resume to continue")
        if self.is_main:
            if exists and overwrite:
                shutil.rmtree(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # A resumed or rerun stage is not complete until it says so again.
            (self.output_dir / MANIFEST).unlink(missing_ok=True)
            if cfg is not None:
                from common.config import save_config

                save_config(cfg, self.output_dir / CONFIG)

    def add_input(self, name: str, path: str | Path, upstream: bool = False) -> dict[str, Any] | None:
        """Record an input; with upstream=True, require and fingerprint its complete manifest."""
        path = Path(path)
        entry: dict[str, Any] = {"path": str(path)}
        manifest = None
        if upstream:
            manifest = load_upstream(path)
            entry["stage"] = manifest.get("stage")
            entry["manifest_sha256"] = sha256_file(path / MANIFEST)
        elif path.is_file() and path.stat().st_size <= (64 << 20):
            entry["sha256"] = sha256_file(path)
        self.inputs[name] = entry
        return manifest

    def finish(self, outputs: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
        """Write manifest.json (atomically, last). Outputs are paths relative to the folder."""
        missing = [str(v) for v in outputs.values()
                   if isinstance(v, (str, Path)) and not (self.output_dir / v).exists()]
        if missing:
            raise RuntimeError(f"{self.stage}: outputs missing, refusing to mark complete: {missing}")
        from common.config import config_dict

        cfg = config_dict(self.cfg) if self.cfg is not None else {}
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "start_time": self.started,
            "end_time": _now(),
            "config": cfg,
            "inputs": self.inputs,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "metrics": metrics,
            "seed": cfg.get("seed"),
            "versions": package_versions(),
            "git_commit": git_commit(),
        }
        if extra:
            manifest.update(extra)
        if self.is_main:
            atomic_write_json(self.output_dir / MANIFEST, manifest)
        return manifest
