"""Benchmark: stage 01 (01_build_corpus.py) against datatrove on >= 50 MB of text. Not a test.

Builds a corpus of at least --target_mb megabytes (UTF-8) from the demo raw data (PRC law articles,
Wikipedia leads, People's Daily): the raw documents first, then further copies whose sentences are
shuffled (seeded), so that the copies are near-duplicates rather than exact ones. Then, for each
--num_proc, in one run and interleaved (timings on a shared machine drift; ratios within one run hold):

    ours       01_build_corpus.main: normalize, language, Gopher quality, Gopher repetition, PII,
               decontamination (no eval sets: a no-op), fingerprint (exact key + datasketch MinHash),
               exact and near dedup (MinHashLSH), split, mixture, writing the outputs
    datatrove  the equivalent datatrove 0.10.1 steps: GopherQualityFilter + GopherRepetitionFilter
               (separate instances for zh and en, with this stage's Chinese bounds), PIIFormatter
               (e-mail and IP only), JsonlWriter; then MinHash in its 4 stages (signatures, buckets,
               cluster, filter), 14 buckets x 8 hashes, 3-gram shingles like ours

Each variant runs in its own subprocess; peak memory is the largest total PSS of its process tree
(psutil, sampled every 0.5 s; PSS splits pages shared by forked workers instead of counting them twice) and the main process's own peak (getrusage). Both variants import this
stage (for its tokenizers), whose common.log imports torch: ~300 MB of the main process is that.

Fairness notes. datatrove's word tokenizers for English and Chinese are spaCy ("eng" -> spaCy, "cmn"
-> spaCy with jieba); spaCy is not installed here, so datatrove gets this stage's tokenizers through
its `WordTokenizer` interface: regex words for English, rjieba for Chinese. That is the fastest
datatrove can be on this box; with spaCy it is slower. Our run does strictly more work (normalize,
language id, decontamination, ID/phone/card PII, split and mixture).

    python bench/bench_corpus.py                          # 50 MB, --num_proc 1 2 (~15 min on 2 cores)
    python bench/bench_corpus.py --target_mb 3 --num_proc 1   # a quick look
Outputs go to bench/out/corpus/ (git-ignored); results to bench/out/corpus/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.run import load_script  # noqa: E402

STAGE_STEPS = {  # our step -> the datatrove step doing the same job
    "quality": "Gopher quality",
    "repetition": "Gopher repetition",
    "pii": "PII formatter",
    "fingerprint": "MinHash signatures",
    "near_dedup": "MinHash buckets + cluster + filter",
}


def load_stage():
    return load_script(ROOT / "01_build_corpus.py", "build_corpus")


# ------------------------------------------------------------------------------------------------
# Corpus

_SENTENCE = re.compile(r"(?<=[。！？!?.])\s*")


def build_corpus(raw: Path, out: Path, target_mb: float, shards: int = 2) -> dict:
    """Write {law,wiki,pd}-<shard>.jsonl under out/input; returns sizes. Reuses an existing build."""
    info_path = out / "input" / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["target_mb"] == target_mb and info["shards"] == shards:
            return info
    bc = load_stage()
    cfg = bc.Config(domain=["x"], general=["y"])
    sources = {"law": raw / "laws.jsonl", "wiki": raw / "wiki_en.jsonl", "pd": raw / "peoples_daily.jsonl"}
    texts = {name: [json.loads(line)["text"] for line in path.open(encoding="utf-8")] for name, path in sources.items()}
    records = {name: [] for name in sources}
    pass_bytes = sum(len(t.encode("utf-8")) for docs in texts.values() for t in docs)
    total, copy = 0, 0
    target = target_mb * 1e6
    while total < target:
        share = min(1.0, (target - total) / pass_bytes)  # the last pass takes the same share of every source
        for name, docs in texts.items():
            for i, text in enumerate(docs[: max(1, round(share * len(docs)))]):
                if copy:
                    parts = [p for p in _SENTENCE.split(text) if p]
                    random.Random(f"{copy}-{name}-{i}").shuffle(parts)
                    text = ("" if name != "wiki" else " ").join(parts)
                records[name].append({"id": f"{name}-{copy}-{i}", "text": text, "lang": bc.detect_lang(text, cfg)})
                total += len(text.encode("utf-8"))
        copy += 1
    (out / "input").mkdir(parents=True, exist_ok=True)
    for name, recs in records.items():
        for s in range(shards):
            with open(out / "input" / f"{name}-{s}.jsonl", "w", encoding="utf-8") as f:
                for r in recs[s::shards]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    info = {"target_mb": target_mb, "shards": shards, "bytes": total, "docs": sum(map(len, records.values())),
            "copies": copy, "docs_by_source": {k: len(v) for k, v in records.items()}}
    info_path.write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------
# Variants (each runs in a subprocess: `--_variant NAME`)

def variant_ours(out: Path, num_proc: int) -> dict:
    bc = load_stage()
    from common.config import make_config

    inp = out / "input"
    cfg = make_config(bc.Config, {
        "domain": [f"law={inp}/law-*.jsonl"], "general": [f"wiki={inp}/wiki-*.jsonl", f"pd={inp}/pd-*.jsonl"],
        "min_words_zh": 8, "min_words_en": 20, "replay_ratio": 0.5, "validation_fraction": 0.0,
        "general_validation_fraction": 0.0, "num_proc": num_proc, "plot": False,
        "output_dir": str(out / f"ours_np{num_proc}"), "overwrite": True})
    t0 = time.perf_counter()
    metrics = bc.main(cfg)
    wall = time.perf_counter() - t0
    stats = json.loads((out / f"ours_np{num_proc}" / "stats.json").read_text())
    steps = {k: v for k, v in stats["timing"].items()}
    return {"wall": wall, "kept": metrics["docs_after_filters"], "steps": steps}


def variant_datatrove(out: Path, num_proc: int) -> dict:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    bc = load_stage()
    cfg = bc.Config(domain=["x"], general=["y"])

    class RegexTokenizer(WordTokenizer):
        def word_tokenize(self, text):
            return bc.tokens_of(text, "en")

        def sent_tokenize(self, text):
            return [s for s in _SENTENCE.split(text) if s]

        def span_tokenize(self, text):
            return [(0, len(text))]

    class JiebaTokenizer(RegexTokenizer):
        def word_tokenize(self, text):
            return bc.tokens_of(text, "zh")

    class ScriptTokenizer(RegexTokenizer):
        def word_tokenize(self, text):
            return bc.tokens_of(text, bc.detect_lang(text, cfg))

    class ByLang(BaseFilter):
        """Apply `inner` to documents of one language, pass the others through."""

        def __init__(self, inner, lang):
            self.name = f"{inner.name} [{lang}]"
            super().__init__()
            self.inner, self.lang = inner, lang

        def filter(self, doc):
            return self.inner.filter(doc) if doc.metadata.get("lang") == self.lang else True

    en, zh = RegexTokenizer("en"), JiebaTokenizer("zh")
    work = out / f"datatrove_np{num_proc}"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    tasks = num_proc * 2  # input shards per source: 2; readers split files across tasks
    mh = MinhashConfig(n_grams=3)
    timings = {}

    def run(name, pipeline, n_tasks, workers):
        t0 = time.perf_counter()
        stats = LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=workers, logging_dir=str(work / "logs" / name),
                                      start_method="fork", skip_completed=False).run()
        timings[name] = {"wall": time.perf_counter() - t0,
                         "steps": {s.name: float(s.time_stats.total) for s in stats.stats}}

    def reader(folder):
        return JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None, add_file_path=False)

    run("filters", [
        reader(out / "input"),
        ByLang(GopherQualityFilter(min_doc_words=20, language=en), "en"),
        ByLang(GopherQualityFilter(min_doc_words=8, min_avg_word_length=1.2, max_avg_word_length=5,
                                   max_non_alpha_words_ratio=0.7, min_stop_words=1,
                                   stop_words=list(bc.STOP_WORDS["zh"]), language=zh), "zh"),
        ByLang(GopherRepetitionFilter(language=en), "en"),
        ByLang(GopherRepetitionFilter(top_n_grams=((2, 0.3), (3, 0.3), (4, 0.3)),
                                      dup_n_grams=((5, .5), (6, .47), (7, .44), (8, .41), (9, .38), (10, .35)),
                                      language=zh), "zh"),
        PIIFormatter(),
        JsonlWriter(str(work / "filtered"), output_filename="${rank}.jsonl", compression=None),
    ], tasks, num_proc)
    n_files = len(list((work / "filtered").glob("*.jsonl")))
    run("minhash_signatures", [reader(work / "filtered"),
                               MinhashDedupSignature(str(work / "sigs"), config=mh, language=ScriptTokenizer("x"))],
        n_files, num_proc)
    run("minhash_buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mh)],
        mh.num_buckets, num_proc)
    run("minhash_cluster", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=mh)], 1, 1)
    run("minhash_filter", [reader(work / "filtered"), MinhashDedupFilter(str(work / "remove_ids")),
                           JsonlWriter(str(work / "deduped"), output_filename="${rank}.jsonl", compression=None)],
        n_files, num_proc)
    kept = sum(1 for p in (work / "deduped").glob("*.jsonl") for _ in p.open())
    return {"wall": sum(t["wall"] for t in timings.values()), "kept": kept, "jobs": timings}


def run_variant(name: str, out: Path, num_proc: int, result: Path) -> None:
    import psutil

    peak = {"tree": 0}
    done = threading.Event()

    def sample():
        me = psutil.Process()
        while not done.is_set():
            try:
                procs = [me] + me.children(recursive=True)
                # PSS: forked workers share the parent's pages; RSS would count them once per process
                peak["tree"] = max(peak["tree"], sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            done.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    res = (variant_ours if name == "ours" else variant_datatrove)(out, num_proc)
    done.set()
    thread.join()
    res["peak_tree_mb"] = peak["tree"] / 1e6
    res["peak_main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    result.write_text(json.dumps(res, indent=2))


# ------------------------------------------------------------------------------------------------

def _spin(_=None) -> float:
    t0 = time.perf_counter()
    total = 0
    for i in range(10_000_000):
        total += i * i
    return time.perf_counter() - t0


def machine_scaling(n: int) -> float:
    """Throughput of n processes running a pure-Python loop, relative to one: what the box can give."""
    import multiprocessing as mp

    one = _spin()
    with mp.get_context("fork").Pool(n) as pool:
        times = pool.map(_spin, range(n))
    return n * one / max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target_mb", type=float, default=50.0, help="corpus size in UTF-8 megabytes (>= 50 for the issue)")
    ap.add_argument("--num_proc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--variants", nargs="+", default=["ours", "datatrove"], choices=["ours", "datatrove"])
    ap.add_argument("--raw", default=str(ROOT / "data/demo/raw"), help="demo raw data (data/provision_demo.py)")
    ap.add_argument("--out", default=str(ROOT / "bench/out/corpus"))
    ap.add_argument("--_variant", help=argparse.SUPPRESS)
    ap.add_argument("--_np", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args._variant:
        run_variant(args._variant, out, args._np, Path(args._result))
        return

    info = build_corpus(Path(args.raw), out, args.target_mb)
    mb = info["bytes"] / 1e6
    print(f"corpus: {info['docs']:,} docs, {mb:.1f} MB UTF-8 ({info['copies']} passes over the demo raw data; "
          f"{info['docs_by_source']})", flush=True)
    for n in args.num_proc:
        if n > 1:
            print(f"machine check: {n} processes of a pure-Python loop give {machine_scaling(n):.2f}x the throughput "
                  "of one (the ceiling for any scaling below)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DF_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for n in args.num_proc:
        for name in args.variants:  # interleaved: ours, datatrove at 1 process, then at 2, ...
            path = out / f"result_{name}_np{n}.json"
            print(f"running {name} with {n} process(es) ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--_variant", name, "--_np", str(n),
                                   "--_result", str(path)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{name} np={n} failed")
            results[(name, n)] = json.loads(path.read_text())
    docs = info["docs"]

    print("\n| variant | procs | wall s | docs/s | MB/s | kept docs | peak PSS, all processes MB | peak RSS, main MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, n), r in results.items():
        print(f"| {name} | {n} | {r['wall']:.1f} | {docs / r['wall']:,.0f} | {mb / r['wall']:.2f} | {r['kept']:,} | "
              f"{r['peak_tree_mb']:,.0f} | {r['peak_main_mb']:,.0f} |")
    for n in args.num_proc:
        if ("ours", n) in results and ("datatrove", n) in results:
            print(f"\nnp={n}: datatrove wall / ours wall = {results[('datatrove', n)]['wall'] / results[('ours', n)]['wall']:.2f}x "
                  f"(>1: ours faster, for more work)")
    for name in args.variants:
        ns = [n for n in args.num_proc if (name, n) in results]
        if len(ns) > 1:
            print(f"{name}: scaling {ns[0]} -> {ns[-1]} processes: "
                  f"{results[(name, ns[0])]['wall'] / results[(name, ns[-1])]['wall']:.2f}x faster")

    # Per step, per-process throughput (step seconds summed over processes) at the first process count.
    n = args.num_proc[0]
    if ("ours", n) in results:
        ours = results[("ours", n)]["steps"]
        print(f"\nPer step at np={n} (ours: seconds summed over processes; datatrove: its step time summed over tasks)")
        print("| our step | docs in | s | docs/s | MB/s |")
        print("|---|---:|---:|---:|---:|")
        for step, t in ours.items():
            print(f"| {step} | {t['docs']:,} | {t['seconds']:.1f} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.2f} |")
    if ("datatrove", n) in results:
        print("\n| datatrove job / step | s |")
        print("|---|---:|")
        for job, t in results[("datatrove", n)]["jobs"].items():
            print(f"| {job} (wall) | {t['wall']:.1f} |")
            for step, secs in t["steps"].items():
                print(f"| &nbsp; {step} | {secs:.1f} |")
        if ("ours", n) in results:
            ours = results[("ours", n)]["steps"]
            dt = results[("datatrove", n)]["jobs"]
            q = sum(v for k, v in dt["filters"]["steps"].items() if "Quality" in k)
            rep = sum(v for k, v in dt["filters"]["steps"].items() if "Repetition" in k)
            pii = sum(v for k, v in dt["filters"]["steps"].items() if "PII" in k)
            sig = sum(v for k, v in dt["minhash_signatures"]["steps"].items() if "stage 1" in k)
            rest = sum(dt[j]["wall"] for j in ("minhash_buckets", "minhash_cluster", "minhash_filter"))
            print("\n| job | ours s | datatrove s | datatrove / ours |")
            print("|---|---:|---:|---:|")
            for label, a, b in (("Gopher quality", ours["quality"]["seconds"], q),
                                ("Gopher repetition", ours["repetition"]["seconds"], rep),
                                ("PII", ours["pii"]["seconds"], pii),
                                ("MinHash signatures", ours["fingerprint"]["seconds"], sig),
                                ("near-dup index/cluster/filter", ours["near_dedup"]["seconds"], rest)):
                print(f"| {label} | {a:.1f} | {b:.1f} | {b / max(a, 1e-9):.2f}x |")
    (out / "results.json").write_text(json.dumps({"corpus": info, "results": {f"{k[0]}_np{k[1]}": v for k, v in results.items()}},
                                                 indent=2))


if __name__ == "__main__":
    main()
