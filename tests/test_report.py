"""The pipeline report renders from fixture stage folders, marks unfinished stages, draws PNGs
only from data present, and refreshes one stage's section when that stage is rerun."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.report import PAPER_REFERENCES, build_report, flatten, fmt, write_report
from common.run import sha256_file

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _manifest(folder: Path, stage: str, metrics: dict, status: str = "complete", **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "status": status, "start_time": "2026-11-22T03:00:00+00:00",
                "end_time": "2026-11-22T03:09:12+00:00", "config": {"seed": 7}, "inputs": {}, "outputs": {},
                "metrics": metrics, "seed": 7, "versions": {"python": "3.11"}, "git_commit": "abc1234"}
    manifest.update(extra)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder / "manifest.json"


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _sft_eval(scale: float = 1.0) -> dict:
    def m(r1, r2, rl, b):
        return {"law_qa": {"rouge1": r1 * scale, "rouge2": r2, "rougeL": rl, "bleu4": b, "n": 40}}

    return {"stages": [{"name": "1_general", **m(0.21, 0.08, 0.19, 6.5)},
                       {"name": "2_domain", **m(0.31, 0.14, 0.28, 12.25)},
                       {"name": "3_soe", **m(0.3366, 0.151, 0.3012, 13.87)}],
            "single_stage": m(0.3210, 0.143, 0.29, 12.71)}


def build_run(root: Path) -> Path:
    run = root / "runs" / "demo"
    m01 = _manifest(run / "01_corpus", "01_corpus",
                    {"docs_kept": 25012, "replay_share_achieved": 0.49481234, "dedup": {"exact_removed": 210,
                                                                                        "near_removed": 57}},
                    config={"seed": 7, "replay_ratio": 0.5})
    _json(run / "01_corpus" / "stats.json", {"sources": {"laws": {"read": 26196, "kept": 25012}}})

    cpt = run / "02_cpt"
    _manifest(cpt, "02_cpt", {"ppl_domain_before": 11.8123, "ppl_domain_after": 4.91234, "ppl_general_before": 25.5,
                              "ppl_general_after": 25.41, "retention": 1.0035419, "domain_gain": 2.404598,
                              "picked_replay_ratio": 0.5, "train_tokens": 258048},
              inputs={"corpus": {"path": str(run / "01_corpus"), "stage": "01_corpus",
                                 "manifest_sha256": sha256_file(m01)}})
    _json(cpt / "eval.json", {"before": {"law": {"ppl": 11.8123}, "piqa": {"acc": 0.655}},
                              "after": {"law": {"ppl": 4.91234}, "piqa": {"acc": 0.645}},
                              "retention": {"piqa": 0.98473}, "domain_gain": {"law_ppl": 2.404598}})
    for ratio, ret, gain in ((0.0, 0.951, 2.61), (0.25, 0.987, 2.52), (0.5, 1.0035, 2.4046), (0.75, 1.008, 1.93)):
        _json(cpt / "sweep" / f"ratio_{ratio:.2f}" / "eval.json",
              {"replay_ratio": ratio, "retention": ret, "domain_gain": gain})

    _manifest(run / "03_sft", "03_sft", {"final_rouge1": 0.3366, "retention": 0.9921},
              inputs={"model": {"path": str(cpt), "stage": "02_cpt",
                                "manifest_sha256": sha256_file(cpt / "manifest.json")}})
    _json(run / "03_sft" / "eval.json", _sft_eval())

    _manifest(run / "04_distill", "04_distill", {"acceptance_before": 0.02}, status="running")

    _manifest(run / "05_spec", "05_spec", {"lossless_share": 1.0, "prompts": 24})
    _json(run / "05_spec" / "results.json", {"methods": [
        {"method": "baseline", "tokens_per_s": 80.1, "speedup": 1.0},
        {"method": "undistilled_draft", "tokens_per_s": 65.7, "speedup": 0.8202, "acceptance_rate": 0.0512},
        {"method": "distilled_draft", "tokens_per_s": 107.8, "speedup": 1.34567, "acceptance_rate": 0.712345},
        {"method": "prompt_lookup", "tokens_per_s": 88.0, "speedup": 1.0986, "acceptance_rate": 0.30}]})
    return run


def sections(text: str) -> dict[str, str]:
    """The report cut at its `<!-- section:NAME -->` markers; "header" is everything before."""
    parts = re.split(r"<!-- section:(\S+) -->", text)
    out = {"header": parts[0]}
    out.update(dict(zip(parts[1::2], parts[2::2])))
    return out


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_report_renders_sections_tables_and_plots(tmp_path):
    run = build_run(tmp_path)
    path = write_report(run)
    assert path == run / "REPORT.md"
    text = path.read_text()
    sec = sections(text)
    assert list(sec) == ["header", "01_corpus", "02_cpt", "03_sft", "04_distill", "05_spec", "references"]

    head = sec["header"]
    assert "# domain-forge report — demo" in head and "Generated " in head
    assert "| 02_cpt | complete | 9m 12s |" in head
    assert "`abc1234`" in head and "Seeds: 7" in head
    assert "| 04_distill | incomplete — rerun (manifest status is 'running') |" in head
    assert "report/general_vs_domain.png" in head

    # 01: generic nested metrics flattened, replay share beside ixi-GEN's ~50%.
    s01 = sec["01_corpus"]
    assert "| `dedup.near_removed` | 57 |" in s01 and "| `docs_kept` | 25012 |" in s01
    assert "0.4948 (49.5%) | ~50% | ixi-GEN" in s01
    assert "| `sources.laws.kept` | 25012 |" in s01  # from stats.json

    # 02: before/after pairs, key figures with SOAEsV2's retention, sweep table, picked ratio.
    s02 = sec["02_cpt"]
    assert "| `ppl_domain` | 11.81 | 4.912 | 0.4159 |" in s02
    assert "| `law.ppl` | 11.81 | 4.912 |" in s02 and "| `piqa.acc` | 0.655 | 0.645 |" in s02
    assert "1.004 (100.4%) | 0.998 (99.8% kept) | SOAEsV2" in s02
    assert "×2.405" in s02 and "| `train_tokens` | 258048 |" in s02
    assert "### Replay-ratio sweep" in s02 and "| ratio_0.50 | 0.5 |" in s02 and "✓ picked" in s02
    assert "report/cpt_replay_sweep.png" in s02

    # 03: per-stage ROUGE/BLEU table incl. the single-stage baseline; ratio beside SOAEsV2's x1.02/x1.06.
    s03 = sec["03_sft"]
    assert "| `stages.3_soe.law_qa` | 0.3366 | 0.151 | 0.3012 | 13.87 | 40 |" in s03
    assert "| `single_stage.law_qa` | 0.321 | 0.143 | 0.29 | 12.71 | 40 |" in s03
    assert f"×{0.3366 / 0.3210:.4g} | ×1.02 | SOAEsV2" in s03
    assert f"×{13.87 / 12.71:.4g} | ×1.06 | SOAEsV2" in s03
    assert "report/sft_stages.png" in s03

    # 04: unfinished -> one line, no metrics from the stale manifest.
    s04 = sec["04_distill"]
    assert "**incomplete — rerun**" in s04 and "0.02" not in s04

    # 05: per-method table, best speedup beside 1.39-1.52x, lossless share.
    s05 = sec["05_spec"]
    assert "| `distilled_draft` | 1.346 | 0.7123 | 107.8 |" in s05
    assert "best speedup (`distilled_draft`) | 1.346× | 1.39–1.52× | SOAEsV2" in s05
    assert "1 (100.0%) | no quality loss" in s05
    assert "report/spec_speedup.png" in s05

    refs = sec["references"]
    for ref in PAPER_REFERENCES.values():
        assert ref["shown"] in refs
    assert "arXiv 2505.04723" in refs and "arXiv 2507.06795" in refs

    for name in ("general_vs_domain.png", "cpt_replay_sweep.png", "sft_stages.png", "spec_speedup.png"):
        assert _is_png(run / "report" / name), name
    assert not list((run / "report").glob("*.tmp")) and not list(run.glob(".REPORT.md.*"))


def test_rerun_of_one_stage_changes_only_its_section(tmp_path):
    run = build_run(tmp_path)
    before = sections(write_report(run).read_text())
    results = json.loads((run / "05_spec" / "results.json").read_text())
    results["methods"][2]["speedup"] = 1.4321
    (run / "05_spec" / "results.json").write_text(json.dumps(results))
    _manifest(run / "05_spec", "05_spec", {"lossless_share": 0.9583, "prompts": 24},
              end_time="2026-11-22T04:00:00+00:00")
    after = sections(write_report(run).read_text())
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"header", "05_spec"}
    assert "1.432×" in after["05_spec"] and "0.9583 (95.8%)" in after["05_spec"]
    assert "| 05_spec | complete | 1h 00m |" in after["header"]


def test_stale_downstream_and_missing_stages(tmp_path):
    run = build_run(tmp_path)
    # 02 rerun after 03 read it: 03 is flagged.
    _manifest(run / "02_cpt", "02_cpt", {"retention": 0.99, "domain_gain": 1.5})
    s = sections(build_report(run))
    assert "02_cpt) was rerun after this stage read it" in s["03_sft"]
    assert "rerun after" not in s["02_cpt"]
    # Stage folders gone or empty: "not run yet"; a folder without manifest: incomplete.
    import shutil

    shutil.rmtree(run / "03_sft")
    (run / "05_spec" / "manifest.json").unlink()
    shutil.rmtree(run / "02_cpt" / "sweep")
    s = sections(write_report(run).read_text())
    assert "**not run yet**" in s["03_sft"] and "| 03_sft | not run yet |" in s["header"]
    assert "**incomplete — rerun** (the folder exists but has no manifest.json)" in s["05_spec"]
    # Plots whose data is gone are removed; the overview still has 02's point.
    assert not (run / "report" / "sft_stages.png").exists() and not (run / "report" / "spec_speedup.png").exists()
    assert not (run / "report" / "cpt_replay_sweep.png").exists()
    assert _is_png(run / "report" / "general_vs_domain.png")


def test_empty_run_and_odd_metrics_do_not_crash(tmp_path):
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    text = write_report(run).read_text()
    assert text.count("**not run yet**") == 5 and "No stage has reported both" in text
    assert not (run / "report").exists() or not list((run / "report").glob("*.png"))
    # Unknown shapes: lists, strings, NaN, bools, nulls, deep nesting, a broken json file beside.
    _manifest(run / "02_cpt", "02_cpt", {"weird": [1, 2, 3], "note": "a|b\nc", "x": float("nan"), "flag": True,
                                         "none": None, "deep": {"a": {"b": {"c": 1234567.891}}},
                                         "runs": [{"k": 2, "acc": 0.5}, {"k": 4, "acc": 0.25}]})
    (run / "02_cpt" / "eval.json").write_text("{not json")
    (run / "01_corpus").mkdir()
    (run / "01_corpus" / "manifest.json").write_text("[1, 2")
    _manifest(run / "05_spec", "05_spec", {"a": {"speedup": float("inf"), "acceptance": float("nan")},
                                           "b": {"speedup": 1.2}})
    _manifest(run / "03_sft", "03_sft", {"only": {"rouge1": float("inf")}})
    s = sections(write_report(run).read_text())
    assert _is_png(run / "report" / "spec_speedup.png") and not (run / "report" / "sft_stages.png").exists()
    assert "| `a` | inf | nan |" in s["05_spec"]
    s02 = s["02_cpt"]
    assert "| `weird` | 1, 2, 3 |" in s02 and "| `note` | a\\|b c |" in s02 and "| `x` | nan |" in s02
    assert "| `deep.a.b.c` | 1.235e+06 |" in s02 and "| `runs.k=4.acc` | 0.25 |" in s02
    assert "`eval.json` could not be read" in s02
    assert "incomplete — rerun" in s["01_corpus"]


def test_flatten_and_fmt():
    assert fmt(0.123456) == "0.1235" and fmt(3) == "3" and fmt(None) == "—" and fmt(12345.678) == "1.235e+04"
    flat = flatten({"a": {"b": 1.5}, "s": [{"name": "x", "v": 1}, {"name": "y", "v": 2}], "samples": [{"p": "q"}]})
    assert flat == {"a.b": 1.5, "s.x.v": 1, "s.y.v": 2}


def test_cli(tmp_path):
    run = build_run(tmp_path)
    out = subprocess.run([sys.executable, "-m", "common.report", "--run_dir", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (run / "REPORT.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "common.report", "--run_dir", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "no such run folder" in bad.stderr


@pytest.mark.parametrize("stage", ["02_cpt", "03_sft"])
def test_key_figures_need_no_files(tmp_path, stage):
    run = tmp_path / "r"
    _manifest(run / stage, stage, {"retention": 0.9981, "domain_gain_rouge1": 1.0812})
    s = sections(write_report(run).read_text())[stage]
    assert "0.9981 (99.8%) | 0.998 (99.8% kept) | SOAEsV2" in s and "×1.081 | ×1.08 | SOAEsV2" in s
