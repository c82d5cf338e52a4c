"""Run folder and manifest.json: contents, atomic last write, refusal rules."""

import json
from dataclasses import dataclass, field

import pytest
import yaml

from common.errors import UserError
from common.run import StageRun, load_upstream, resolve_output_dir, sha256_file


@dataclass
class Cfg:
    seed: int = field(default=3, metadata={"help": "seed"})
    name: str = field(default="x", metadata={"help": "name"})


def _finish_stage(folder, stage="01_corpus"):
    run = StageRun(stage, folder, Cfg())
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    return run.finish(outputs={"train": "train.jsonl"}, metrics={"docs": 1})


def test_manifest_contents(tmp_path):
    out = tmp_path / "01_corpus"
    m = _finish_stage(out)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m, default=str))
    assert on_disk["stage"] == "01_corpus" and on_disk["status"] == "complete"
    assert on_disk["seed"] == 3 and on_disk["config"] == {"seed": 3, "name": "x"}
    assert on_disk["outputs"] == {"train": "train.jsonl"} and on_disk["metrics"] == {"docs": 1}
    assert on_disk["start_time"] <= on_disk["end_time"]
    assert "torch" in on_disk["versions"] and "git_commit" in on_disk
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"seed": 3, "name": "x"}
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "train.jsonl"]


def test_upstream_recorded_with_manifest_hash(tmp_path):
    up = tmp_path / "01_corpus"
    _finish_stage(up)
    run = StageRun("02_cpt", tmp_path / "02_cpt", Cfg())
    manifest = run.add_input("corpus", up, upstream=True)
    assert manifest["stage"] == "01_corpus"
    assert run.inputs["corpus"]["manifest_sha256"] == sha256_file(up / "manifest.json")


def test_refuses_incomplete_upstream(tmp_path):
    up = tmp_path / "01_corpus"
    up.mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        load_upstream(up)
    (up / "manifest.json").write_text(json.dumps({"stage": "01_corpus", "status": "running"}))
    with pytest.raises(UserError, match="not 'complete'"):
        load_upstream(up)
    with pytest.raises(UserError, match="does not exist"):
        load_upstream(tmp_path / "nope")


def test_refuses_non_empty_output_without_flag(tmp_path):
    out = tmp_path / "02_cpt"
    _finish_stage(out, "02_cpt")
    with pytest.raises(UserError, match="not empty.*--overwrite.*--resume"):
        StageRun("02_cpt", out, Cfg())
    # --resume keeps files but the stage is no longer complete until it finishes again.
    StageRun("02_cpt", out, Cfg(), resume=True)
    assert (out / "train.jsonl").exists() and not (out / "manifest.json").exists()
    StageRun("02_cpt", out, Cfg(), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_rerun_after_early_failure_needs_no_flag(tmp_path):
    # A stage that fails right after StageRun (e.g. its upstream is unfinished) leaves only config.yaml.
    out = tmp_path / "02_cpt"
    StageRun("02_cpt", out, Cfg())
    with pytest.raises(UserError, match="does not exist"):
        StageRun("02_cpt", out, Cfg()).add_input("corpus", tmp_path / "01_corpus", upstream=True)
    StageRun("02_cpt", out, Cfg(name="y"))
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "y"
    (out / "partial.bin").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        StageRun("02_cpt", out, Cfg())


def test_missing_output_never_marked_complete(tmp_path):
    run = StageRun("01_corpus", tmp_path / "o", Cfg())
    with pytest.raises(RuntimeError, match="outputs missing"):
        run.finish(outputs={"train": "train.jsonl"}, metrics={})
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_output_dir_resolution(tmp_path):
    assert resolve_output_dir(None, str(tmp_path), "02_cpt") == tmp_path / "02_cpt"
    assert resolve_output_dir("x", str(tmp_path), "02_cpt").name == "x"
    with pytest.raises(UserError, match="--output_dir or --run_dir"):
        resolve_output_dir(None, None, "02_cpt")
