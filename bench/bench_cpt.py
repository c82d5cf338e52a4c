"""Benchmark: 02_continual_pretrain.py's training path vs a plain transformers Trainer, same run.

Both variants train the same model on the same packed blocks with the same settings (QLoRA NF4 +
double quant, LoRA r16 all-linear, bf16 autocast where the CPU has it, batch x block, cosine, AdamW):

  ours           the stage's own `train_run` (load_train_model, PackedBlocks + BlockCollator, CPTCallback,
                 Trainer), periodic evaluation off so only training is timed; --packing_attention cross,
                 i.e. the same attention as plain
  plain          the textbook recipe: from_pretrained + BitsAndBytesConfig, prepare_model_for_kbit_training,
                 get_peft_model, a `datasets.Dataset` of blocks (run_clm's group_texts output),
                 default_data_collator, Trainer
  ours_separate  ours with --packing_attention separate, the stage's default (block-diagonal mask)

Each run is a fresh subprocess (clean peak RSS); variants are interleaved over rounds (A B C, B C A,
...) because timings on a shared 2-core box swing with the load; the ratios are the result.
Tokens/s counts the steps after the first `--warmup` ones. Also prints the packing's non-padding share
against one-document-per-row padding.

    .venv/bin/python bench/bench_cpt.py                          # SmolLM2, 30 steps, 2 rounds, 2 threads
    .venv/bin/python bench/bench_cpt.py --steps 10 --rounds 1 --variants ours plain
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.run import load_script  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DF_NO_PROGRESS", "1")


def load_stage():
    return load_script(ROOT / "02_continual_pretrain.py", "continual_pretrain")


def step_timer(warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of the optimizer steps after `warmup` (the same callback in every variant)."""

        def __init__(self):
            self.t0, self.t_end, self.steps = None, None, 0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                self.t0 = time.perf_counter()
            elif state.global_step > warmup:
                self.t_end, self.steps = time.perf_counter(), state.global_step - warmup

    return StepTimer()


def worker(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    blocks = np.load(args.blocks)
    timer = step_timer(args.warmup)
    tokens_per_step = args.batch_size * args.block_size
    out = Path(tempfile.mkdtemp(prefix=f"bench_cpt_{args.worker}_"))
    if args.worker in ("ours", "ours_separate"):
        cpt = load_stage()
        from accelerate import PartialState

        from common.config import make_config
        from common.log import MetricsLogger, resolve_dtype
        from common.modeling import load_tokenizer

        cfg = make_config(cpt.Config, {
            "model_name_or_path": args.model, "block_size": args.block_size, "batch_size": args.batch_size,
            "max_steps": args.steps, "learning_rate": 2e-4, "eval_every": 0, "save_every": 0, "log_every": 10,
            "packing_attention": "separate" if args.worker == "ours_separate" else "cross", "seed": 0})
        state = PartialState(cpu=True)
        ctx = {"state": state, "is_main": True, "device": torch.device("cpu"), "use_cpu": True, "local_rank": 0,
               "compute_dtype": resolve_dtype("auto", "cpu"), "tokens_per_step": tokens_per_step}
        tok = load_tokenizer(args.model)
        cpt.train_run(cfg, ctx, out, blocks, np.arange(args.steps * args.batch_size) % len(blocks), args.steps, {}, None,
                      tok, MetricsLogger(out / "metrics.jsonl"), {}, "bench", extra_callbacks=[timer])
    else:
        import datasets
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, default_data_collator

        from common.log import resolve_dtype

        dtype = resolve_dtype("auto", "cpu")
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype, device_map={"": "cpu"})
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        rows = blocks[np.arange(args.steps * args.batch_size) % len(blocks)].astype(np.int64).tolist()
        ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
        targs = TrainingArguments(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                  learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=1, bf16=dtype == torch.bfloat16,
                                  use_cpu=True, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                                  seed=0, dataloader_pin_memory=False, train_sampling_strategy="sequential")
        Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator, callbacks=[timer]).train()
    elapsed = (timer.t_end - timer.t0) if timer.t0 and timer.t_end else float("nan")
    return {"variant": args.worker, "tok_s": timer.steps * tokens_per_step / elapsed, "timed_steps": timer.steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def packing_report(cpt, tokenizer, sources: list[Path], n_docs: int, block_size: int, tmp: Path):
    """Write a mixed jsonl, tokenize and pack it with the stage's code; return blocks and shares."""
    import numpy as np

    mixed = tmp / "bench_train.jsonl"
    with open(mixed, "w", encoding="utf-8") as fh:
        for src in sources:
            for i, (_, obj) in enumerate(cpt.iter_jsonl(src)):
                if i >= n_docs:
                    break
                fh.write(json.dumps({"text": obj["text"], "kind": "general" if "wiki" in src.name else "domain"},
                                    ensure_ascii=False) + "\n")
    t = time.perf_counter()
    docs = cpt.tokenize_file(mixed, tokenizer, tmp / "cache", ["general"])
    order = np.random.default_rng(0).permutation(len(docs))
    blocks = cpt.pack_blocks(docs, order, block_size)
    secs = time.perf_counter() - t
    lengths = docs.lengths
    total = int(lengths.sum())
    padded_real = int(np.minimum(lengths, block_size).sum())
    return blocks, {
        "documents": len(docs), "tokens": total, "blocks": len(blocks), "tokenize_pack_s": round(secs, 2),
        "packed_non_padding_share": 1.0, "packed_tokens_used_share": blocks.size / total,
        "padded_non_padding_share": padded_real / (len(docs) * block_size),
        "padded_tokens_truncated_share": 1 - padded_real / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--sources", nargs="+", default=[str(ROOT / "data/demo/raw/laws.jsonl"), str(ROOT / "data/demo/raw/wiki_en.jsonl")],
                   help="jsonl files with `text` (a file named *wiki* counts as general)")
    p.add_argument("--docs", type=int, default=3000, help="documents read from each source")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["ours", "plain", "ours_separate"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--blocks", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import numpy as np

    from common.modeling import load_tokenizer

    cpt = load_stage()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpt_"))
    tokenizer = load_tokenizer(args.model)
    blocks, packing = packing_report(cpt, tokenizer, [Path(s) for s in args.sources], args.docs, args.block_size, tmp)
    np.save(tmp / "blocks.npy", blocks)
    print(f"packing ({packing['documents']} docs, {packing['tokens']:,} tokens, block {args.block_size}): "
          f"non-padding share {packing['packed_non_padding_share']:.3f} packed vs {packing['padded_non_padding_share']:.3f} "
          f"one-document-per-row padded; packing uses {packing['packed_tokens_used_share']:.4f} of the tokens "
          f"(padding would truncate {packing['padded_tokens_truncated_share']:.3f}); tokenize+pack {packing['tokenize_pack_s']} s",
          flush=True)

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for variant in order:
            cmd = [sys.executable, __file__, "--worker", variant, "--blocks", str(tmp / "blocks.npy"), "--model", args.model,
                   "--block_size", str(args.block_size), "--batch_size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            results[variant].append(res)
            print(f"round {r + 1} {variant:<14} {res['tok_s']:8.1f} tok/s  peak RSS {res['peak_rss_mb']:7.0f} MB", flush=True)

    print("\nvariant         tok/s (median)  peak RSS MB (max)")
    med = {v: statistics.median(x["tok_s"] for x in rs) for v, rs in results.items()}
    rss = {v: max(x["peak_rss_mb"] for x in rs) for v, rs in results.items()}
    for v in results:
        print(f"{v:<15} {med[v]:14.1f} {rss[v]:18.0f}")
    if "ours" in med and "plain" in med:
        pairs = [a["tok_s"] / b["tok_s"] for a, b in zip(results["ours"], results["plain"])]
        print(f"\nours / plain Trainer: tokens/s ratio {med['ours'] / med['plain']:.3f} (per round: "
              f"{', '.join(f'{x:.3f}' for x in pairs)}); peak RSS ratio {rss['ours'] / rss['plain']:.3f}")
    if "ours_separate" in med and "ours" in med:
        print(f"separate / cross packing attention: tokens/s ratio {med['ours_separate'] / med['ours']:.3f}")
    summary = {"packing": packing, "results": results, "median_tok_s": med, "peak_rss_mb": rss, "settings": vars(args)}
    print("\n" + json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
