"""The pipeline report: `runs/<name>/REPORT.md` and its plots, rebuilt from the stage folders.

    python -m common.report --run_dir runs/demo

reads each stage folder's `manifest.json` (01_corpus, 02_cpt, 03_sft, 04_distill, 05_spec) and the
json files the stage wrote beside it (`eval.json`, `results.json`, `stats.json`, json outputs named
in the manifest, and 02's `sweep/`), and writes

    runs/<name>/REPORT.md                      header, one section per stage, the papers' numbers
    runs/<name>/report/general_vs_domain.png   general retention vs domain gain, per stage and replay ratio
    runs/<name>/report/cpt_replay_sweep.png    02: retention and domain gain against the replay ratio
    runs/<name>/report/sft_stages.png          03: ROUGE-1/2/L and BLEU-4 per SFT stage and baseline
    runs/<name>/report/spec_speedup.png        05: speedup and acceptance per decoding method

Every section is a function of its own stage folder only, so rerunning one stage and then this
command refreshes that section and leaves the others as they were. A stage folder without a
`complete` manifest gets one line: "not run yet" (no folder) or "incomplete — rerun". A plot is
drawn only from data that is present.

Metrics may have any keys. Nested dicts are flattened to dotted keys (lists of dicts are labelled by
their `name`/`stage`/`method`/... field) and shown in generic tables, floats to 4 significant
digits. Keys the report recognises get special treatment, by substring of the key:
`retention`, `domain_gain`, `ppl_domain`/`ppl_general` and any `*_before`/`*_after` or
`before.*`/`after.*` pair (before/after table), `rouge1`/`rouge2`/`rougeL`/`bleu4` (per-stage SFT
table; groups whose name contains `single` or `baseline` are the single-stage baseline), `speedup`
and `acceptance` (per-method table), `replay_ratio` (sweep rows, replay share).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.eval import domain_gain
from common.run import MANIFEST, STAGES, atomic_write_text, sha256_file

SOAESV2 = "SOAEsV2 (arXiv 2505.04723)"
IXIGEN = "ixi-GEN / DACP (arXiv 2507.06795)"

# The published numbers this pipeline reproduces, each with its source. Ratios are after/before
# (or method/baseline) so they compare directly with `retention`, `domain_gain` and `speedup`.
PAPER_REFERENCES: dict[str, dict[str, Any]] = {
    "cpt_general_retention": {
        "value": 0.998, "shown": "0.998 (99.8% kept)", "source": SOAESV2,
        "what": "general capability kept after continual pre-training"},
    "cpt_domain_rouge1_gain": {
        "value": 1.08, "shown": "×1.08", "source": SOAESV2,
        "what": "domain Rouge-1 after continual pre-training / before"},
    "cpt_domain_bleu4_gain": {
        "value": 1.17, "shown": "×1.17", "source": SOAESV2,
        "what": "domain BLEU-4 after continual pre-training / before"},
    "sft_progressive_vs_single_rouge1": {
        "value": 1.02, "shown": "×1.02", "source": SOAESV2,
        "what": "domain-progressive SFT / single-stage SFT, Rouge-1"},
    "sft_progressive_vs_single_bleu4": {
        "value": 1.06, "shown": "×1.06", "source": SOAESV2,
        "what": "domain-progressive SFT / single-stage SFT, BLEU-4"},
    "spec_speedup": {
        "value": (1.39, 1.52), "shown": "1.39–1.52×", "source": SOAESV2,
        "what": "decoding speedup of the 72B target with a distilled 7B draft"},
    "spec_quality": {
        "value": 1.0, "shown": "no quality loss", "source": SOAESV2,
        "what": "output quality of distillation-enhanced speculative decoding vs the target alone"},
    "cpt_replay_share": {
        "value": 0.5, "shown": "~50%", "source": IXIGEN,
        "what": "share of general pseudo-replay text in the domain-adaptive pre-training mixture"},
    "cpt_replay_sweep": {
        "value": None, "shown": "general vs domain score per replay ratio", "source": IXIGEN,
        "what": "replay/domain proportion swept against general and domain benchmarks"},
}

TITLES = {"01_corpus": "Corpus", "02_cpt": "Continual pre-training", "03_sft": "Domain-progressive SFT",
          "04_distill": "Draft distillation", "05_spec": "Speculative decoding"}
NOT_RUN = "not run yet"
INCOMPLETE = "incomplete — rerun"
COMPLETE = "complete"

PLOTS = {"overview": "general_vs_domain.png", "sweep": "cpt_replay_sweep.png", "sft": "sft_stages.png",
         "spec": "spec_speedup.png"}
STAGE_FILES = ("eval.json", "results.json", "stats.json")
MAX_ROWS = 60
MAX_COLS = 8
_SKIP_KEYS = {"samples", "predictions", "references", "texts", "outputs_text"}
_NAME_KEYS = ("name", "stage", "method", "variant", "label", "backend", "run")
_VALUE_LABEL_KEYS = ("replay_ratio", "ratio", "k")
_MAX_JSON_BYTES = 8 << 20
_RATIO_KEYS = ("replay_ratio", "ratio", "replay", "replay_share")  # last key part naming a sweep row's ratio
_PICKED_KEYS = ("picked_replay", "chosen_replay", "selected_replay", "best_replay")


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt(value: Any) -> str:
    """One table cell: floats to 4 significant digits, None as a dash, text kept short."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def fmt_times(value: float) -> str:
    return f"×{fmt(value)}"


def fmt_share(value: float) -> str:
    return f"{fmt(value)} ({value * 100:.1f}%)" if math.isfinite(value) else fmt(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def number(value: Any) -> float | None:
    """A metric value as float, or None when it is not a number (bools are not metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def table(header: list[str], rows: list[list[Any]], note_more: str = "") -> list[str]:
    """Markdown table lines; rows beyond MAX_ROWS are counted, not shown."""
    lines = ["| " + " | ".join(fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n… {len(rows) - MAX_ROWS} more rows{note_more}.")
    return lines


# ---------------------------------------------------------------------------------------------
# Flattening any json into dotted keys


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "runs": [{"name": "x", "acc": 0.5}]} -> {"a.b": 1, "runs.x.acc": 0.5}.

    Lists of scalars become one short text cell; lists of dicts are labelled by a name-like field
    (or `ratio=0.25`, or their index). Sample texts and predictions are skipped.
    """
    out: dict[str, Any] = {}

    def join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def walk(x: Any, path: str) -> None:
        if len(out) >= 5000:
            return
        if isinstance(x, dict):
            for k, v in x.items():
                if str(k) not in _SKIP_KEYS:
                    walk(v, join(path, str(k)))
        elif isinstance(x, (list, tuple)):
            if all(not isinstance(e, (dict, list, tuple)) for e in x):
                out[path or "value"] = ", ".join(fmt(e) for e in x) if len(x) <= 8 else f"[{len(x)} values]"
                return
            seen: set[str] = set()
            for i, item in enumerate(x):
                label, drop = str(i), None
                if isinstance(item, dict):
                    for key in _NAME_KEYS:
                        if isinstance(item.get(key), (str, int)) and not isinstance(item.get(key), bool):
                            label, drop = str(item[key]), key
                            break
                    else:
                        for key in _VALUE_LABEL_KEYS:
                            if number(item.get(key)) is not None:
                                label = f"{key}={fmt(item[key])}"
                                break
                if label in seen:
                    label, drop = str(i), None
                seen.add(label)
                if isinstance(item, dict) and drop:
                    item = {k: v for k, v in item.items() if k != drop}
                walk(item, join(path, label))
        else:
            out[path or "value"] = x

    walk(obj, prefix)
    return out


def _canon(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


# ---------------------------------------------------------------------------------------------
# Reading a stage folder


@dataclass
class Stage:
    name: str
    folder: Path
    status: str = NOT_RUN
    detail: str = ""
    manifest: dict | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> flattened metrics
    sweep: list[dict[str, Any]] = field(default_factory=list)  # 02 only: one flat dict per replay run
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def wall_seconds(self) -> float | None:
        m = self.manifest or {}
        try:
            start = _dt.datetime.fromisoformat(str(m["start_time"]))
            end = _dt.datetime.fromisoformat(str(m["end_time"]))
            return (end - start).total_seconds()
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def seed(self) -> Any:
        m = self.manifest or {}
        seed = m.get("seed")
        if seed is None and isinstance(m.get("config"), dict):
            seed = m["config"].get("seed")
        return seed


def _read_json(path: Path, warnings: list[str]) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            warnings.append(f"`{path.name}` is larger than {_MAX_JSON_BYTES >> 20} MB; not read")
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"`{path.name}` could not be read ({type(exc).__name__})")
        return None


def read_stage(run_dir: Path, name: str) -> Stage:
    folder = run_dir / name
    stage = Stage(name, folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return stage
    path = folder / MANIFEST
    if not path.is_file():
        stage.status, stage.detail = INCOMPLETE, f"the folder exists but has no {MANIFEST}"
        return stage
    manifest = _read_json(path, stage.warnings)
    if not isinstance(manifest, dict):
        stage.status, stage.detail = INCOMPLETE, f"{MANIFEST} is not a readable JSON object"
        return stage
    stage.manifest = manifest
    if manifest.get("status") != COMPLETE:
        stage.status, stage.detail = INCOMPLETE, f"manifest status is {manifest.get('status')!r}"
        return stage
    stage.status = COMPLETE
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict) and metrics:
        stage.sources[f"{MANIFEST} metrics"] = flatten(metrics)
    names = list(STAGE_FILES)
    outputs = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
    names += [str(v) for v in outputs.values() if str(v).endswith(".json") and str(v) not in names]
    for rel in names:
        p = folder / rel
        if p.is_file() and p.name != MANIFEST and p.resolve().is_relative_to(folder.resolve()):
            data = _read_json(p, stage.warnings)
            if data is not None:
                flat = flatten(data)
                if flat:
                    stage.sources[f"`{rel}`"] = flat
    stage.sweep = _read_sweep(folder, stage)
    stage.warnings += _stale_upstreams(run_dir, manifest)
    return stage


def _ratio_of(flat: dict[str, Any], name: str = "") -> float | None:
    for key, value in flat.items():
        if key.split(".")[-1].lower() in _RATIO_KEYS and number(value) is not None:
            return number(value)
    m = re.search(r"(\d+(?:\.\d+)?)", name)
    if m:
        v = float(m.group(1))
        return v / 100 if v > 1 else v
    return None


def _read_sweep(folder: Path, stage: Stage) -> list[dict[str, Any]]:
    """Rows of a replay-ratio sweep: `sweep/*.json` tables or `sweep/<run>/{eval,manifest}.json`."""
    rows: list[dict[str, Any]] = []
    sweep = folder / "sweep"
    if sweep.is_dir():
        for p in sorted(sweep.glob("*.json")):
            data = _read_json(p, stage.warnings)
            if isinstance(data, dict):
                data = next((data[k] for k in ("rows", "results", "runs", "sweep") if isinstance(data.get(k), list)),
                            [dict(v, run=k) if isinstance(v, dict) else {"run": k, "value": v} for k, v in data.items()])
            if isinstance(data, list):
                rows += [flatten(r) for r in data if isinstance(r, dict)]
        for sub in sorted(p for p in sweep.iterdir() if p.is_dir()):
            row: dict[str, Any] = {"run": sub.name}
            for fname in ("eval.json", MANIFEST):
                if (sub / fname).is_file():
                    data = _read_json(sub / fname, stage.warnings)
                    if isinstance(data, dict) and fname == MANIFEST:
                        data = data.get("metrics")
                    if isinstance(data, dict):
                        row.update({k: v for k, v in flatten(data).items() if k not in row})
            if len(row) > 1:
                rows.append(row)
    if not rows:
        # A sweep table embedded in the metrics: `sweep.<label>.<key>`.
        for flat in stage.sources.values():
            groups: dict[str, dict[str, Any]] = {}
            for key, value in flat.items():
                parts = key.split(".")
                if len(parts) >= 3 and parts[0] == "sweep":
                    groups.setdefault(parts[1], {"run": parts[1]})[".".join(parts[2:])] = value
            if groups:
                rows = list(groups.values())
                break
    for row in rows:
        row["_ratio"] = _ratio_of({k: v for k, v in row.items() if k != "run"}, str(row.get("run", "")))
    rows.sort(key=lambda r: (r["_ratio"] is None, r["_ratio"] or 0.0))
    return rows


def _stale_upstreams(run_dir: Path, manifest: dict) -> list[str]:
    """Warn when an upstream stage of this run was rerun after this stage read it."""
    notes = []
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    for name, entry in inputs.items():
        if not isinstance(entry, dict) or entry.get("stage") not in STAGES or not entry.get("manifest_sha256"):
            continue
        here = run_dir / entry["stage"]
        try:
            same_folder = Path(str(entry.get("path", ""))).resolve() == here.resolve()
        except OSError:
            same_folder = False
        if same_folder and (here / MANIFEST).is_file() and sha256_file(here / MANIFEST) != entry["manifest_sha256"]:
            notes.append(f"input `{name}` ({entry['stage']}) was rerun after this stage read it; rerun this stage")
    return notes


# ---------------------------------------------------------------------------------------------
# Picking known metrics


def _is_before_after(key: str) -> bool:
    return any(c in ("before", "after") or re.search(r"(^|_)(before|after)($|_)", c) for c in key.lower().split("."))


def _headline(flat: dict[str, Any], word: str, ok=None) -> tuple[str, float] | None:
    """(key, value) of the least nested, shortest key containing `word` whose value is a number passing `ok`."""
    found = [(k, number(v)) for k, v in flat.items()
             if word in k.lower() and number(v) is not None and not _is_before_after(k)
             and (ok is None or ok(number(v)))]
    return min(found, key=lambda kv: (kv[0].count("."), len(kv[0]))) if found else None


def pick(stage: Stage, word: str, ok=None) -> tuple[str, float] | None:
    """The headline value of a metric whose key contains `word` (and whose value passes `ok`):
    the least nested, shortest key, from the manifest's metrics first, then the stage's own files."""
    for flat in stage.sources.values():
        hit = _headline(flat, word, ok)
        if hit:
            return hit
    return None


def before_after_pairs(flat: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], set[str]]:
    """Pairs of keys that differ only in before/after: ("ppl_domain", 11.8, 4.9), and the keys used."""
    pairs: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, value in flat.items():
        parts = key.split(".")
        for i, part in enumerate(parts):
            low = part.lower()
            if low in ("before", "after"):
                role, rest = low, ""
            else:
                m = re.fullmatch(r"(?:(before|after)_(.+)|(.+)_(before|after))", part, flags=re.IGNORECASE)
                if not m:
                    continue
                role = (m.group(1) or m.group(4)).lower()
                rest = m.group(2) or m.group(3)
            base = ".".join(p for p in parts[:i] + ([rest] if rest else []) + parts[i + 1:]) or "value"
            pairs.setdefault(base, {})[role] = (key, value)
            break
    out, used = [], set()
    for base, both in pairs.items():
        if "before" in both and "after" in both:
            out.append((base, both["before"][1], both["after"][1]))
            used.update({both["before"][0], both["after"][0]})
    return out, used


_SFT_METRICS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougel": "ROUGE-L", "rougelsum": "ROUGE-L",
                "bleu4": "BLEU-4", "bleu": "BLEU-4"}
_RATIO_WORDS = ("gain", "ratio", "vs", "over", "retention", "delta", "rel")
_SPEC_DROP = {"speedup", "acceptance", "rate", "mean", "vs", "baseline", "x", "ratio", "expected", "alpha"}


def _sft_metric(last: str) -> tuple[str, str] | None:
    """("ROUGE-1", leftover) for `rouge1`, `rouge_1`, `stage1_rouge1`..., None otherwise."""
    low = last.lower()
    for token in sorted(_SFT_METRICS, key=len, reverse=True):
        for sep in ("", "_", "-"):
            spelled = token if not sep else token.replace("rouge", f"rouge{sep}").replace("bleu", f"bleu{sep}")
            if low == spelled:
                return _SFT_METRICS[token], ""
            if low.endswith("_" + spelled):
                rest = last[: -len(spelled) - 1]
                if any(w in rest.lower().split("_") for w in _RATIO_WORDS):
                    return None
                return _SFT_METRICS[token], rest
    return None


def _spec_metric(last: str) -> tuple[str, str] | None:
    low = last.lower()
    if "speedup" in low:
        kind = "speedup"
    elif "acceptance" in low:
        kind = "acceptance"
    else:
        return None
    rest = "_".join(t for t in low.split("_") if t and t not in _SPEC_DROP and "speedup" not in t and "acceptance" not in t)
    return kind, rest


def groups(flat: dict[str, Any], classify) -> tuple[dict[str, dict[str, float]], set[str]]:
    """Rows of a per-group table: {group label: {metric: value}}, in order of appearance.

    A group is the key's prefix (plus what is left of its last part once the metric name is
    removed); other numbers under the same prefix join the row as extra columns.
    """
    rows: dict[str, dict[str, float]] = {}
    prefixes: dict[str, str] = {}
    used: set[str] = set()
    for key, value in flat.items():
        if number(value) is None or _is_before_after(key):
            continue
        parts = key.split(".")
        hit = classify(parts[-1])
        if not hit:
            continue
        metric, rest = hit
        label = ".".join(parts[:-1] + ([rest] if rest else []))
        rows.setdefault(label, {})[metric] = number(value)
        if not rest:
            prefixes[label] = ".".join(parts[:-1])
        used.add(key)
    siblings: dict[str, list[str]] = {}
    for key in flat:
        siblings.setdefault(key.rpartition(".")[0], []).append(key)
    for label, prefix in prefixes.items():
        for key in siblings.get(prefix, []):
            value = flat[key]
            if key not in used and number(value) is not None and len(rows[label]) < MAX_COLS \
                    and not _is_before_after(key):
                rows[label][key.rpartition(".")[2]] = number(value)
                used.add(key)
    # Drop the leading parts every label shares ("stages.", "results.") so labels stay short.
    labels = [lb.split(".") for lb in rows]
    common = 0
    if len(labels) > 1:
        while all(len(lb) > common + 1 for lb in labels) and len({lb[common] for lb in labels}) == 1:
            common += 1
    renamed = {(".".join(lb.split(".")[common:]) or "(overall)"): v for lb, v in rows.items()}
    return renamed, used


def _is_baseline(label: str) -> bool:
    return "single" in label.lower() or "baseline" in label.lower()


def progressive_vs_single(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, str, float]]:
    """(metric, progressive group, baseline group, ratio) for ROUGE-1 and BLEU-4.

    The progressive group compared with a baseline is the last non-baseline group whose label
    ends like the baseline's once its single/baseline part is removed (the same eval set).
    """
    out = []
    for base_label, base in rows.items():
        if not _is_baseline(base_label):
            continue
        residual = ".".join(p for p in base_label.split(".") if not _is_baseline(p))
        candidates = [lb for lb in rows if not _is_baseline(lb) and (not residual or lb == residual
                                                                      or lb.endswith("." + residual))]
        if not candidates:
            continue
        prog = candidates[-1]
        for metric in ("ROUGE-1", "BLEU-4"):
            p, b = rows[prog].get(metric), base.get(metric)
            if p is not None and b not in (None, 0.0):
                out.append((metric, prog, base_label, domain_gain(b, p, "rouge1" if metric == "ROUGE-1" else "bleu4")))
    return out


# ---------------------------------------------------------------------------------------------
# Key figures beside the papers


def _ref(key: str) -> tuple[str, str]:
    ref = PAPER_REFERENCES[key]
    return ref["shown"], ref["source"].split(" (")[0]


def key_figures(stage: Stage) -> list[list[str]]:
    rows: list[list[str]] = []
    hit = pick(stage, "retention")
    if hit:
        paper, src = _ref("cpt_general_retention") if stage.name in ("02_cpt", "03_sft") else ("—", "")
        rows.append([f"general ability kept (`{hit[0]}`)", fmt_share(hit[1]), paper, src])
    hit = pick(stage, "domain_gain")
    if hit:
        low = _canon(hit[0])
        if "bleu" in low:
            paper, src = _ref("cpt_domain_bleu4_gain")
        elif "rouge" in low:
            paper, src = _ref("cpt_domain_rouge1_gain")
        else:
            paper, src = "Rouge-1 ×1.08, BLEU-4 ×1.17 (on domain QA)", "SOAEsV2"
        if stage.name not in ("02_cpt", "03_sft"):
            paper, src = "—", ""
        rows.append([f"domain gain (`{hit[0]}`)", fmt_times(hit[1]), paper, src])
    if stage.name in ("01_corpus", "02_cpt"):
        hit = None
        for word in (*_PICKED_KEYS, "replay"):
            hit = pick(stage, word, ok=lambda v: 0.0 <= v <= 1.0)  # a share, not a count of replayed docs
            if hit:
                break
        if hit is None and isinstance((stage.manifest or {}).get("config"), dict):
            value = number(stage.manifest["config"].get("replay_ratio"))
            hit = ("config.replay_ratio", value) if value is not None else None
        if hit:
            paper, src = _ref("cpt_replay_share")
            rows.append([f"general replay share (`{hit[0]}`)", fmt_share(hit[1]), paper, src])
    for label, flat in stage.sources.items():
        pairs, _ = before_after_pairs(flat)
        for base, before, after in pairs:
            low = base.lower()
            if any(w in low for w in ("ppl", "perplexity", "accept", "agreement")) and number(before) is not None \
                    and number(after) is not None and len(rows) < 12:
                rows.append([f"`{base}` before → after", f"{fmt(before)} → {fmt(after)}", "—", ""])
        if pairs:
            break
    sft_rows = _stage_groups(stage, _sft_metric)
    for metric, prog, base, ratio in progressive_vs_single(sft_rows):
        paper, src = _ref("sft_progressive_vs_single_rouge1" if metric == "ROUGE-1" else "sft_progressive_vs_single_bleu4")
        rows.append([f"{metric}: `{prog}` / `{base}` (progressive vs single-stage)", fmt_times(ratio), paper, src])
    for flat in stage.sources.values():
        for key, value in flat.items():
            low = _canon(key)
            if "single" in low and any(w in key.lower() for w in ("ratio", "vs", "over")) and number(value) is not None:
                ref = "sft_progressive_vs_single_bleu4" if "bleu" in low else "sft_progressive_vs_single_rouge1"
                if "bleu" in low or "rouge1" in low:
                    paper, src = _ref(ref)
                    rows.append([f"`{key}`", fmt_times(number(value)), paper, src])
    spec_rows = _stage_groups(stage, _spec_metric)
    speed = [(v["speedup"], g) for g, v in spec_rows.items() if "speedup" in v]
    if speed:
        best, method = max(speed)
        paper, src = _ref("spec_speedup")
        rows.append([f"best speedup (`{method}`)", f"{fmt(best)}×", paper, src])
    accept = [(v["acceptance"], g) for g, v in spec_rows.items() if "acceptance" in v]
    if accept:
        best, method = max(accept)
        rows.append([f"best acceptance (`{method}`)", fmt(best), "—", ""])
    for word in ("lossless", "identical"):
        hit = pick(stage, word)
        if hit:
            paper, src = _ref("spec_quality")
            rows.append([f"greedy output identical to the target's (`{hit[0]}`)", fmt_share(hit[1]), paper, src])
            break
    return rows


def _stage_groups(stage: Stage, classify) -> dict[str, dict[str, float]]:
    """Per-group rows from the stage's own files first (more detail), else the manifest's metrics."""
    ordered = [lb for lb in stage.sources if lb != f"{MANIFEST} metrics"] + [f"{MANIFEST} metrics"]
    for label in ordered:
        if label in stage.sources:
            rows, _ = groups(stage.sources[label], classify)
            if rows:
                return rows
    return {}


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Agg; each one only from data that is present)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a report is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fig.clf()
        import matplotlib.pyplot as plt

        plt.close(fig)


def _finite(value: float | None) -> float:
    """NaN for a missing or infinite value: matplotlib skips NaN bars but fails on infinite ones."""
    return value if value is not None and math.isfinite(value) else float("nan")


def _try_plot(fn, *args) -> bool:
    """A plot that fails (odd data, a matplotlib quirk) must not cost the whole report."""
    try:
        return bool(fn(*args))
    except Exception as exc:  # noqa: BLE001 - logged, and the report says the plot is missing
        logging.getLogger("domain_forge.report").warning("plot %s failed: %s: %s", fn.__name__, type(exc).__name__, exc)
        return False


def plot_overview(stages: list[Stage], path: Path) -> bool:
    points = []
    for st in stages:
        if st.complete:
            r, g = pick(st, "retention"), pick(st, "domain_gain")
            if r and g and all(math.isfinite(v) for v in (r[1], g[1])):
                points.append((st.name, r[1], g[1]))
    sweep = []
    for st in stages:
        if st.complete and st.name == "02_cpt":
            for row in st.sweep:
                r, g = _row_pick(row, "retention"), _row_pick(row, "domain_gain")
                if r is not None and g is not None and math.isfinite(r) and math.isfinite(g):
                    sweep.append((row["_ratio"], r, g))
    plt = _pyplot()
    if plt is None or not (points or sweep):
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if sweep:
        ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "o--", color="0.6", label="02 replay sweep")
        for ratio, r, g in sweep:
            ax.annotate(f"replay {fmt(ratio)}", (r, g), textcoords="offset points", xytext=(4, -10), fontsize=8, color="0.4")
    for name, r, g in points:
        ax.scatter([r], [g], s=60, zorder=3, label=name)
        ax.annotate(name, (r, g), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ref_r = PAPER_REFERENCES["cpt_general_retention"]["value"]
    for key, marker in (("cpt_domain_rouge1_gain", "*"), ("cpt_domain_bleu4_gain", "P")):
        ax.scatter([ref_r], [PAPER_REFERENCES[key]["value"]], marker=marker, s=110, color="black", zorder=3,
                   label=f"SOAEsV2 CPT ({'Rouge-1' if 'rouge' in key else 'BLEU-4'})")
    ax.axvline(1.0, color="0.8", lw=1)
    ax.axhline(1.0, color="0.8", lw=1)
    ax.set_xlabel("general retention (after / before)")
    ax.set_ylabel("domain gain (after / before)")
    ax.set_title("General ability kept vs domain gained")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def _row_pick(row: dict[str, Any], word: str) -> float | None:
    hit = _headline(row, word)
    return hit[1] if hit else None


def plot_sweep(stage: Stage, path: Path) -> bool:
    rows = [(r["_ratio"], _row_pick(r, "retention"), _row_pick(r, "domain_gain")) for r in stage.sweep if r["_ratio"] is not None]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharex=True)
    for ax, idx, label in ((axes[0], 1, "general retention"), (axes[1], 2, "domain gain")):
        pts = [(r[0], r[idx]) for r in rows if r[idx] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue" if idx == 1 else "tab:orange")
        ax.axvline(PAPER_REFERENCES["cpt_replay_share"]["value"], color="0.6", ls=":", label="ixi-GEN ~50% replay")
        ax.axhline(1.0, color="0.85", lw=1)
        ax.set_xlabel("general replay share")
        ax.set_ylabel(f"{label} (after / before)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle("Replay ratio sweep (ixi-GEN style)")
    _save(fig, path)
    return True


def plot_sft(rows: dict[str, dict[str, float]], path: Path) -> bool:
    def present(metric: str) -> bool:
        return any(not math.isnan(_finite(v.get(metric))) for v in rows.values())

    rouge = [m for m in ("ROUGE-1", "ROUGE-2", "ROUGE-L") if present(m)]
    bleu = present("BLEU-4")
    plt = _pyplot()
    if plt is None or not (rouge or bleu):
        return False
    labels = list(rows)
    panels = [p for p in (("ROUGE (F1)", rouge), ("BLEU-4", ["BLEU-4"] if bleu else [])) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.2 * len(labels) * len(panels) + 2), 4.2), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], panels):
        width = 0.8 / len(metrics)
        for j, m in enumerate(metrics):
            xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(labels))]
            ys = [_finite(rows[lb].get(m)) for lb in labels]
            bars = ax.bar(xs, ys, width, label=m)
            for bar, lb in zip(bars, labels):
                if _is_baseline(lb):
                    bar.set_hatch("//")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if len(metrics) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("SFT metrics per stage (hatched: single-stage baseline)")
    _save(fig, path)
    return True


def plot_spec(rows: dict[str, dict[str, float]], path: Path) -> bool:
    rows = {lb: {k: x for k, x in v.items() if math.isfinite(x)} for lb, v in rows.items()}
    panels = [k for k in ("speedup", "acceptance") if any(k in v for v in rows.values())]
    plt = _pyplot()
    if plt is None or not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        labels = [lb for lb, v in rows.items() if kind in v]
        ax.bar(range(len(labels)), [rows[lb][kind] for lb in labels], color="tab:blue" if kind == "speedup" else "tab:green")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        if kind == "speedup":
            lo, hi = PAPER_REFERENCES["spec_speedup"]["value"]
            ax.axhspan(lo, hi, color="orange", alpha=0.25, label="SOAEsV2 1.39–1.52×")
            ax.axhline(1.0, color="0.5", lw=1, ls="--", label="no speedup")
            ax.set_ylabel("speedup (× baseline tokens/s)")
            ax.legend(fontsize=8)
        else:
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("acceptance rate")
        ax.set_title(kind)
    fig.suptitle("Speculative decoding per method")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# Sections


def _generic_table(flat: dict[str, Any], skip: set[str], where: str) -> list[str]:
    rows = [[f"`{k}`", fmt(v)] for k, v in flat.items() if k not in skip]
    return table(["key", "value"], rows, f" (see {where})") if rows else []


def _sweep_section(stage: Stage, plot_ok: bool) -> list[str]:
    if not stage.sweep:
        return []
    keys: list[str] = []
    for row in stage.sweep:
        keys += [k for k, v in row.items() if k not in keys and not k.startswith("_") and number(v) is not None
                 and k.split(".")[-1].lower() not in _RATIO_KEYS]
    preferred = [k for k in keys if any(w in k.lower() for w in ("retention", "domain_gain", "ppl", "acc"))]
    cols = (preferred + [k for k in keys if k not in preferred])[: MAX_COLS - 2]
    picked = None
    for word in _PICKED_KEYS:
        hit = pick(stage, word)
        if hit:
            picked = hit[1]
            break
    rows = []
    for row in stage.sweep:
        mark = "✓ picked" if picked is not None and row["_ratio"] is not None and abs(row["_ratio"] - picked) < 1e-9 else ""
        rows.append([fmt(row.get("run", "")), fmt(row["_ratio"])] + [fmt(row.get(c)) for c in cols] + [mark])
    lines = ["### Replay-ratio sweep", "", f"{len(stage.sweep)} runs from `sweep/`; ixi-GEN compares general and "
             "domain scores per replay ratio and uses about 50% replay.", ""]
    lines += table(["run", "replay ratio"] + [f"`{c}`" for c in cols] + [""], rows)
    if len(keys) > len(cols):
        lines += ["", f"({len(keys) - len(cols)} more columns in the sweep files.)"]
    if plot_ok:
        lines += ["", f"![replay sweep](report/{PLOTS['sweep']})"]
    return lines + [""]


def _group_table(title: str, rows: dict[str, dict[str, float]], first: list[str], label: str) -> list[str]:
    cols = [c for c in first if any(c in v for v in rows.values())]
    for v in rows.values():
        cols += [c for c in v if c not in cols]
    cols = cols[:MAX_COLS]
    body = [[f"`{g}`"] + [fmt(v.get(c)) for c in cols] for g, v in rows.items()]
    return [f"### {title}", ""] + table([label] + cols, body) + [""]


def stage_section(stage: Stage, plots: dict[str, bool]) -> list[str]:
    lines = [f"<!-- section:{stage.name} -->", f"## {stage.name} — {TITLES[stage.name]}", ""]
    if stage.status == NOT_RUN:
        return lines + [f"**{NOT_RUN}** — no `{stage.name}/` folder in this run.", ""]
    if not stage.complete:
        return lines + [f"**{INCOMPLETE}** ({stage.detail}); its outputs are not valid until `{MANIFEST}` says "
                        "`complete`.", ""]
    m = stage.manifest or {}
    lines += [f"**complete** · wall time {fmt_duration(stage.wall_seconds)} · finished {fmt(m.get('end_time'))} · "
              f"seed {fmt(stage.seed)} · commit `{fmt(m.get('git_commit'))}`", ""]
    for note in stage.warnings:
        lines.append(f"> ⚠ {note}")
    if stage.warnings:
        lines.append("")
    if not stage.sources and not stage.sweep:
        return lines + ["No metrics recorded.", ""]
    figures = key_figures(stage)
    if figures:
        lines += ["### Key figures beside the papers", ""]
        lines += table(["figure", "this run", "paper", "source"], figures) + [""]
    consumed: dict[str, set[str]] = {label: set() for label in stage.sources}
    ba_lines: list[str] = []
    for label, flat in stage.sources.items():
        pairs, used = before_after_pairs(flat)
        if pairs:
            consumed[label] |= used
            rows = []
            for base, before, after in pairs:
                b, a = number(before), number(after)
                ratio = a / b if a is not None and b not in (None, 0.0) else None
                rows.append([f"`{base}`", fmt(before), fmt(after), fmt(ratio)])
            ba_lines += [f"From {label}:", ""] + table(["metric", "before", "after", "after ÷ before"], rows) + [""]
    if ba_lines:
        lines += ["### Before / after", ""] + ba_lines
    lines += _sweep_section(stage, plots.get("sweep", False))
    for label, flat in stage.sources.items():
        rows, used = groups({k: v for k, v in flat.items() if k not in consumed[label]}, _sft_metric)
        if rows:
            consumed[label] |= used
            title = "SFT metrics per stage" if stage.name == "03_sft" else "ROUGE / BLEU"
            lines += _group_table(f"{title} ({label})", rows, ["ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-4"],
                                  "stage / eval set")
    if plots.get("sft") and stage.name == "03_sft":
        lines += [f"![SFT metrics per stage](report/{PLOTS['sft']})", ""]
    for label, flat in stage.sources.items():
        rows, used = groups({k: v for k, v in flat.items() if k not in consumed[label]}, _spec_metric)
        if rows:
            consumed[label] |= used
            lines += _group_table(f"Speedup and acceptance per method ({label})", rows, ["speedup", "acceptance"], "method")
    if plots.get("spec") and stage.name == "05_spec":
        lines += [f"![speculative decoding](report/{PLOTS['spec']})", ""]
    for label, flat in stage.sources.items():
        generic = _generic_table(flat, consumed[label], label)
        if generic:
            lines += [f"### {'Other metrics' if consumed[label] else 'Metrics'} ({label})", ""] + generic + [""]
    return lines


def _header(run_dir: Path, stages: list[Stage], overview: bool) -> list[str]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# domain-forge report — {run_dir.resolve().name}", "",
             f"Generated {now} from `{run_dir}`. Each stage section is rebuilt from that stage's `{MANIFEST}` and "
             f"the json files beside it: rerun a stage, then `python -m common.report --run_dir {run_dir}`.", ""]
    rows = []
    for st in stages:
        m = st.manifest or {}
        status = st.status if st.status != INCOMPLETE else f"{INCOMPLETE} ({st.detail})"
        done = st.complete
        rows.append([st.name, status, fmt_duration(st.wall_seconds) if done else "—",
                     fmt(m.get("end_time")) if done else "—", fmt(st.seed) if done else "—",
                     f"`{fmt(m.get('git_commit'))}`" if done else "—"])
    lines += table(["stage", "status", "wall time", "finished", "seed", "git commit"], rows) + [""]
    commits: dict[str, list[str]] = {}
    seeds: dict[str, list[str]] = {}
    for st in stages:
        if st.complete:
            commits.setdefault(fmt((st.manifest or {}).get("git_commit")), []).append(st.name)
            seeds.setdefault(fmt(st.seed), []).append(st.name)
    if commits:
        lines.append("Git commit(s): " + "; ".join(f"`{c}` ({', '.join(s)})" for c, s in commits.items())
                     + (" — stages come from different commits." if len(commits) > 1 else ""))
        lines.append("Seeds: " + "; ".join(f"{s} ({', '.join(n)})" for s, n in seeds.items()))
        lines.append("")
    lines += ["## General vs domain", ""]
    if overview:
        lines += [f"![general retention vs domain gain](report/{PLOTS['overview']})", "",
                  "Each point is a stage's general retention (after/before) against its domain gain; the grey line is "
                  "02's replay sweep; black markers are SOAEsV2's CPT result.", ""]
    else:
        lines += ["No stage has reported both a `retention` and a `domain_gain` yet.", ""]
    return lines


def _references() -> list[str]:
    lines = ["<!-- section:references -->", "## Reference numbers from the papers", ""]
    rows = [[f"`{k}`", v["what"], v["shown"], v["source"]] for k, v in PAPER_REFERENCES.items()]
    return lines + table(["id", "what", "reported", "source"], rows) + [""]


def build_report(run_dir: str | os.PathLike) -> str:
    """Read the run folder, draw the plots, and return the markdown text (without writing it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    stages = [read_stage(run_dir, name) for name in STAGES]
    out = run_dir / "report"
    by_name = {st.name: st for st in stages}
    made = {
        "overview": _try_plot(plot_overview, stages, out / PLOTS["overview"]),
        "sweep": by_name["02_cpt"].complete and _try_plot(plot_sweep, by_name["02_cpt"], out / PLOTS["sweep"]),
        "sft": by_name["03_sft"].complete
        and _try_plot(plot_sft, _stage_groups(by_name["03_sft"], _sft_metric), out / PLOTS["sft"]),
        "spec": by_name["05_spec"].complete
        and _try_plot(plot_spec, _stage_groups(by_name["05_spec"], _spec_metric), out / PLOTS["spec"]),
    }
    # A plot whose data has gone would otherwise linger beside a report that no longer shows it.
    for key, ok in made.items():
        if not ok:
            (out / PLOTS[key]).unlink(missing_ok=True)
    lines = _header(run_dir, stages, made["overview"])
    for st in stages:
        lines += stage_section(st, {"sweep": made["sweep"] and st.name == "02_cpt", "sft": made["sft"], "spec": made["spec"]})
    lines += _references()
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `<run_dir>/REPORT.md` (atomically) and the PNGs under `<run_dir>/report/`; return the path."""
    text = build_report(run_dir)
    path = Path(run_dir) / "REPORT.md"
    atomic_write_text(path, text)
    return path


@dataclass
class ReportConfig:
    run_dir: str = field(default="runs/demo", metadata={"help": "run folder holding 01_corpus/ ... 05_spec/"})


def main(cfg: ReportConfig) -> Path:
    path = write_report(cfg.run_dir)
    print(path)
    return path


if __name__ == "__main__":
    from common.config import run_main

    run_main(main, ReportConfig)
