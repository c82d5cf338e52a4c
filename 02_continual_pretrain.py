"""Stage 02 — domain-adaptive continual pre-training (CPT) that keeps general ability.

Teaches a general model a domain by continuing its pre-training on 01's mixture of domain text
and general "replay" text (ixi-GEN/DACP: ~50% replay; SOAEsV2: CPT limited so that 99.8% of
general ability is kept). QLoRA by default (NF4, double quantization, bf16 compute where the
hardware runs it fast), so a 7B-72B model trains on few GPUs and a 135M one on a laptop CPU.

Steps:
  1. tokenize 01's `train.jsonl` (cached), optionally resample it to a replay ratio by tokens;
  2. pack: each document gets EOS (and BOS if the tokenizer adds one), documents are concatenated
     in a seeded random order and cut into `--block_size` blocks — no padding at all; only the
     last partial block is dropped;
  3. evaluate the base model (common.eval): domain and general perplexity, MCQ benchmarks;
  4. train with transformers `Trainer` (cosine schedule with warmup, gradient accumulation,
     checkpoints, `--resume`, accelerate/FSDP/DeepSpeed), evaluating domain and general
     perplexity every `--eval_every` steps; the forgetting guard stops (or rolls back) when
     general perplexity rises more than `--max_general_degradation` over the start;
  5. merge the adapter into a full-precision copy of the base (`model/`), evaluate it again, write
     retention and domain gain to `eval.json`.
  With `--replay_ratios 0 0.25 0.5 0.75` steps 1-4 run once per ratio at an equal token budget and
  the ratio is picked by a stated rule (see `pick_ratio`); `sweep/` holds the table and plot.

Packing and attention: padding-free packing puts several documents in one block. By default
(`--packing_attention separate`) a document cannot attend to the one before it: every block
carries `position_ids` that restart at 0 after each EOS and no attention mask, and transformers
turns that into a block-diagonal causal mask (sdpa/eager; flash-attention-2 uses the same
position_ids as variable-length sequences). The tests check that a packed document's logits equal
its logits alone; on CPU this costs ~1% throughput (bench/bench_cpt.py). The KV cache must be off
for it, so training sets `use_cache=False`. `--packing_attention cross` is run_clm's behaviour
(documents see the end of the previous document across the EOS). With `cross` the first token
of a document is predicted from the previous document's EOS position (run_clm); with `separate`
that target is masked (-100), since the document has no context for it.

Forgetting guard: every `--eval_every` steps Trainer evaluates domain and general perplexity
(exp of the eval loss on the first `--eval_docs` documents of each validation set, packed like
the training data, scoring only the text: not a document's first token, not its EOS). The guard watches independent general text (eval/general_ppl*) when 01
provides it, else validation_general, and compares it with step 0. Above
`--max_general_degradation` (relative rise) it logs and `stop`s training, or `rollback`s: training
stops and the shipped weights are those of the evaluated step with the lowest domain perplexity
among the steps still within the limit (step 0 = the base model); every evaluated step is
checkpointed for that. The event and the full evaluation history go to eval.json and the manifest.

Inputs (`--run_dir runs/x` reads `runs/x/01_corpus`, or `--corpus_dir`; its manifest must be complete):
  train.jsonl            records with `text` and `kind` ("domain" | "general"); without `kind`, a record
                         is general when its `source`/`_source` contains one of `--general_source_patterns`
  validation_domain.jsonl, validation_general.jsonl   held-out text (`text`)
  eval/*.jsonl           MCQ sets (question, A, B, ..., answer) and text sets (`text`); `general_ppl*`
                         files are general text from sources no replay set uses: general retention is
                         measured on them when present (replayed-source text cannot show forgetting).
                         Files whose name starts with one of `--domain_eval_prefixes` (default
                         `domain`) are domain sets; chat files are left to stage 03.
Outputs (`--output_dir`, default `<run_dir>/02_cpt`):
  adapter/ (LoRA)  model/ (merged, full precision; loads with AutoModelForCausalLM)  eval.json
  metrics.jsonl  report.md  config.yaml  manifest.json  [sweep/  checkpoints/ with --keep_checkpoints]

Commands:
  tiny CPU demo (~10 min):  python 02_continual_pretrain.py --config configs/demo/02_cpt.yaml --run_dir runs/demo
  plan only (no weights):   python 02_continual_pretrain.py --model_name_or_path /models/Qwen2.5-72B --run_dir runs/x \\
                                --block_size 4096 --gradient_checkpointing --dry_run
  one GPU:                  python 02_continual_pretrain.py --run_dir runs/x --model_name_or_path /models/Qwen2.5-7B \\
                                --block_size 2048 --batch_size 2 --gradient_accumulation_steps 16 --gradient_checkpointing
  multi-GPU, FSDP+QLoRA:    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml 02_continual_pretrain.py ...
  multi-GPU, ZeRO-3:        accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
                                02_continual_pretrain.py --quantization none ...
  two CPU processes (DDP):  torchrun --nproc_per_node 2 02_continual_pretrain.py ...   (QLoRA works on CPU too)
  replay sweep:             ... --replay_ratios 0 0.25 0.5 0.75 --max_train_tokens 256000
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from common.config import run_main
from common.errors import UserError
from common.log import MetricsLogger, get_logger, resolve_device, resolve_dtype, seed_everything, set_threads
from common.modeling import keep_4bit_trainable
from common.run import StageRun, atomic_write_json, atomic_write_text, load_upstream, resolve_input, resolve_output_dir

log = get_logger("cpt")


@dataclass
class Config:
    # --- where things are
    model_name_or_path: str = field(default="models/SmolLM2-135M-Instruct", metadata={"help": "base model folder (transformers format)"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    run_dir: Optional[str] = field(default=None, metadata={"help": "run folder: reads <run_dir>/01_corpus, writes <run_dir>/02_cpt"})
    corpus_dir: Optional[str] = field(default=None, metadata={"help": "01's output folder (overrides <run_dir>/01_corpus)"})
    output_dir: Optional[str] = field(default=None, metadata={"help": "output folder (default <run_dir>/02_cpt)"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "tokenized/packed data cache (default <output_dir>/cache, removed after success)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in the output folder"})
    seed: int = field(default=42, metadata={"help": "seed for sampling, packing order, LoRA init and training"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan (tokens, steps, memory estimate) and exit; needs only config.json"})
    # --- data
    block_size: int = field(default=256, metadata={"help": "tokens per packed training block"})
    packing_attention: str = field(default="separate", metadata={"help": "separate: a document attends only to itself (block-diagonal mask via position_ids); cross: across EOS inside a block, as run_clm"})
    replay_ratios: list[float] = field(default_factory=list, metadata={"help": "general-token shares to resample train.jsonl to; several = one run each (sweep); empty = 01's mixture as is"})
    general_source_patterns: list[str] = field(default_factory=lambda: ["general"], metadata={"help": "without a `kind` field, a record whose source contains one of these is general"})
    # --- model and adapter
    full_finetune: bool = field(default=False, metadata={"help": "train all weights (no LoRA, no quantization)"})
    quantization: str = field(default="auto", metadata={"help": "auto (4bit with LoRA, none with --full_finetune), none, 4bit (QLoRA NF4 double quant), 8bit"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: auto (bf16 where fast, else fp32), bf16, fp16, fp32"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module names to adapt, or all-linear"})
    train_embeddings: bool = field(default=False, metadata={"help": "also train embed_tokens and lm_head in full (a new language or vocabulary needs it)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory, ~30% slower"})
    # --- optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, constant_with_warmup, ...)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps for linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name (adamw_torch, paged_adamw_8bit, ...)"})
    batch_size: int = field(default=4, metadata={"help": "blocks per device per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --max_train_tokens, else --num_train_epochs)"})
    max_train_tokens: int = field(default=0, metadata={"help": "token budget (0: from --max_steps or epochs); the sweep gives each ratio this budget"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the packed data when neither steps nor tokens are given"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    # --- evaluation, guard, checkpoints
    eval_every: int = field(default=50, metadata={"help": "steps between domain/general perplexity evaluations (0 = off; the guard needs it)"})
    eval_docs: int = field(default=64, metadata={"help": "documents per validation set in the periodic evaluation"})
    log_every: int = field(default=10, metadata={"help": "steps between progress lines"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (for --resume)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep at most this many checkpoints (None = all)"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep checkpoints/ and the data cache after success"})
    max_general_degradation: float = field(default=0.05, metadata={"help": "guard: largest allowed relative rise of general perplexity over the start"})
    guard_action: str = field(default="stop", metadata={"help": "stop: end training; rollback: end and restore the best checkpoint; warn: only log"})
    eval_before_after: bool = field(default=True, metadata={"help": "evaluate the base and the trained model with common.eval"})
    eval_limit: int = field(default=200, metadata={"help": "items per MCQ set and documents per perplexity set in the before/after evaluation"})
    eval_batch_size: int = field(default=8, metadata={"help": "batch size of the before/after evaluation"})
    domain_eval_prefixes: list[str] = field(default_factory=lambda: ["domain"], metadata={"help": "eval/ files whose name starts with one of these are domain sets (domain gain); the others are general (retention)"})
    mcq_score: str = field(default="auto", metadata={"help": "MCQ scoring: auto (option below 1B parameters, else letter), letter, option"})
    ddp_timeout: int = field(default=7200, metadata={"help": "seconds a process waits for the others (rank 0 evaluates alone)"})

    def validate(self) -> None:
        choices = {"packing_attention": ("cross", "separate"), "quantization": ("auto", "none", "4bit", "8bit"),
                   "guard_action": ("stop", "rollback", "warn"), "mcq_score": ("auto", "letter", "option")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.full_finetune and self.quantization not in ("auto", "none"):
            raise UserError(f"--full_finetune trains unquantized weights; drop --quantization {self.quantization}")
        if self.block_size < 2:
            raise UserError(f"--block_size must be at least 2, got {self.block_size}")
        for key in ("batch_size", "gradient_accumulation_steps", "lora_r"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "max_train_tokens", "eval_every", "save_every", "eval_docs", "eval_limit"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key} must be >= 0, got {getattr(self, key)}")
        bad = [r for r in self.replay_ratios if not 0.0 <= r <= 1.0]
        if bad:
            raise UserError(f"--replay_ratios must lie in [0, 1], got {bad}")
        if len(set(self.replay_ratios)) != len(self.replay_ratios):
            raise UserError(f"--replay_ratios has duplicates: {self.replay_ratios}")
        if len(self.replay_ratios) > 1 and not self.eval_before_after:
            raise UserError("a --replay_ratios sweep picks by evaluation: keep --eval_before_after true")
        if self.max_general_degradation < 0:
            raise UserError(f"--max_general_degradation must be >= 0, got {self.max_general_degradation}")

    @property
    def quant(self) -> str:
        """The quantization actually used: QLoRA (4bit) by default, none for full fine-tuning."""
        if self.quantization == "auto":
            return "none" if self.full_finetune else "4bit"
        return self.quantization


# =============================================================================================
# Data: read, tokenize (cached), resample to a replay ratio, pack into blocks
# =============================================================================================

KIND_DOMAIN, KIND_GENERAL = 0, 1


def _loads():
    try:
        import orjson

        return orjson.loads
    except ImportError:
        return json.loads


def iter_jsonl(path: Path):
    """(line number, record) of a jsonl file; a bad line is a one-line UserError naming file:line."""
    loads = _loads()
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({str(exc).splitlines()[0][:80]})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: not a JSON object")
            yield n, obj


def record_kind(obj: dict, patterns: list[str], where: str) -> int:
    kind = obj.get("kind")
    if kind is not None:
        if kind not in ("domain", "general"):
            raise UserError(f"{where}: field 'kind' must be 'domain' or 'general', got {kind!r}")
        return KIND_GENERAL if kind == "general" else KIND_DOMAIN
    source = str(obj.get("source") or obj.get("_source") or "")
    return KIND_GENERAL if any(p and p in source for p in patterns) else KIND_DOMAIN


def file_fingerprint(path: Path) -> str:
    """Content hash of a data file (xxh3-128 when available: GB/s, so even a big corpus hashes fast)."""
    try:
        import xxhash

        h = xxhash.xxh3_128()
    except ImportError:
        import hashlib

        h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"{type(tokenizer).__name__}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def check_tokenizer(tokenizer, where: str) -> None:
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: tokenizer has no EOS token; packing needs one between documents "
                        "(set eos_token in tokenizer_config.json)")


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts one in front of text by itself (Llama 2/3), else [] (Qwen, SmolLM2)."""
    from common.metrics import tokenizer_adds_bos

    return [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    # split_special_tokens: a literal "<|endoftext|>" inside a document is text, not a document boundary.
    # verbose=False: documents longer than the model's context are expected here (packing cuts them).
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


class TokenizedDocs:
    """Token ids of every document of a jsonl file, flat (uint32, memory-mapped) with offsets and kinds."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, kinds: np.ndarray, copies: np.ndarray, source: Path, stats: dict):
        self.tokens, self.offsets, self.kinds, self.copies, self.source, self.stats = tokens, offsets, kinds, copies, source, stats

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_file(path: Path, tokenizer, cache_dir: Path, patterns: list[str], limit: int | None = None,
                  write_cache: bool = True) -> TokenizedDocs:
    """Tokenize `text` of each record (+BOS if the tokenizer adds one, +EOS); cached by data and tokenizer."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (01_corpus should have written it)")
    key = f"{path.stem}-{file_fingerprint(path)}-{tokenizer_fingerprint(tokenizer)}-{limit or 'all'}"
    bin_path, meta_path = cache_dir / f"{key}.tokens.bin", cache_dir / f"{key}.meta.npz"
    if bin_path.is_file() and meta_path.is_file():
        meta = np.load(meta_path)
        tokens = np.memmap(bin_path, dtype=np.uint32, mode="r") if bin_path.stat().st_size else np.zeros(0, np.uint32)
        return TokenizedDocs(tokens, meta["offsets"], meta["kinds"], meta["copies"], path, json.loads(str(meta["stats"])))
    prefix, eos = bos_prefix(tokenizer), [tokenizer.eos_token_id]
    offsets, kinds, copies = [0], [], []
    stats = {"records": 0, "empty": 0, "kind_field": 0, "kind_from_source": 0, "copies": 0}
    chunks: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for ids in encode_docs(tokenizer, batch):
            arr = np.asarray(prefix + list(ids) + eos, dtype=np.uint32)
            chunks.append(arr)
            offsets.append(offsets[-1] + len(arr))
        batch.clear()

    for line, obj in iter_jsonl(path):
        if limit is not None and stats["records"] >= limit:
            break
        stats["records"] += 1
        if "text" not in obj:
            raise UserError(f"{path}:{line}: missing field 'text' (fields: {', '.join(map(str, obj))})")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            stats["empty"] += 1
            continue
        stats["kind_field" if obj.get("kind") is not None else "kind_from_source"] += 1
        kinds.append(record_kind(obj, patterns, f"{path}:{line}"))
        is_copy = bool(obj.get("copy") or 0)  # 01 marks upsampled repeats with copy >= 1
        copies.append(is_copy)
        stats["copies"] += is_copy
        batch.append(text)
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint32)
    offsets_arr, kinds_arr, copies_arr = (np.asarray(offsets, dtype=np.int64), np.asarray(kinds, dtype=np.int8),
                                          np.asarray(copies, dtype=np.int8))
    if write_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_suffix(".tmp")
        tokens.tofile(tmp)
        os.replace(tmp, bin_path)
        tmp_meta = cache_dir / f".{key}.meta.tmp.npz"
        np.savez(tmp_meta, offsets=offsets_arr, kinds=kinds_arr, copies=copies_arr, stats=json.dumps(stats))
        os.replace(tmp_meta, meta_path)
    return TokenizedDocs(tokens, offsets_arr, kinds_arr, copies_arr, path, stats)


def resample_by_tokens(docs: TokenizedDocs, ratio: float, budget: int, seed: int) -> tuple[np.ndarray, dict]:
    """Document indices whose tokens are `ratio` general and `1 - ratio` domain, `budget` tokens in all.

    Each pool (original documents only: 01's upsampled copies are left out) is walked in seeded
    random order and repeated (reshuffled) when the target needs more tokens than it has. Returns
    the shuffled indices and the shares achieved.
    """
    rng = np.random.default_rng(seed)
    lengths = docs.lengths
    picked, achieved = [], {}
    for kind, name, target in ((KIND_GENERAL, "general", round(ratio * budget)), (KIND_DOMAIN, "domain", budget - round(ratio * budget))):
        pool = np.flatnonzero((docs.kinds == kind) & (docs.copies == 0))
        if target > 0 and pool.size == 0:
            raise UserError(f"{docs.source}: no {name} records, but replay ratio {ratio} needs {name} text "
                            f"(records carry kind='domain'|'general')")
        got, parts = 0, []
        while got < target:
            perm = rng.permutation(pool)
            cum = np.cumsum(lengths[perm])
            n = int(np.searchsorted(cum, target - got) + 1)
            parts.append(perm[:n])
            got += int(cum[min(n, len(cum)) - 1])
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        picked.append(idx)
        pool_tokens = int(lengths[pool].sum()) if pool.size else 0
        achieved[name] = {"tokens": got, "docs": int(idx.size), "repeats": round(got / pool_tokens, 3) if pool_tokens else 0.0}
    order = rng.permutation(np.concatenate(picked))
    total = sum(v["tokens"] for v in achieved.values())
    achieved["general_share"] = achieved["general"]["tokens"] / total if total else 0.0
    return order, achieved


def pack_blocks(docs: TokenizedDocs, order: np.ndarray, block_size: int) -> np.ndarray:
    """Concatenate documents in `order` and cut into full blocks; the last partial block is dropped."""
    if order.size == 0:
        return np.zeros((0, block_size), np.uint32)
    starts, ends = docs.offsets[order], docs.offsets[order + 1]
    n = int((ends - starts).sum()) // block_size * block_size
    stream = np.empty(int((ends - starts).sum()), dtype=np.uint32)
    pos = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        stream[pos : pos + e - s] = docs.tokens[s:e]
        pos += e - s
    return stream[:n].reshape(-1, block_size)


def cached_blocks(docs: TokenizedDocs, order: np.ndarray, block_size: int, cache_dir: Path, tag: str,
                  write_cache: bool = True) -> np.ndarray:
    """`pack_blocks`, cached by data, tokenizer, document order and block size."""
    import hashlib

    h = hashlib.sha256(order.astype(np.int64).tobytes()).hexdigest()[:16]
    path = cache_dir / f"packed-{tag}-{docs.source.stem}-{h}-b{block_size}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    blocks = pack_blocks(docs, order, block_size)
    if write_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, blocks)
        os.replace(tmp, path)
    return blocks


def eval_blocks(path: Path, tokenizer, block_size: int, limit: int, patterns: list[str]) -> np.ndarray:
    """The first `limit` documents of a validation file packed in file order (one short block if tiny)."""
    docs = tokenize_file(path, tokenizer, Path("/nonexistent"), patterns, limit=limit, write_cache=False)
    if len(docs) == 0:
        raise UserError(f"{path}: empty split (no documents with text)")
    tokens = np.asarray(docs.tokens)
    if len(tokens) < block_size:
        return tokens[None, :]
    return tokens[: len(tokens) // block_size * block_size].reshape(-1, block_size)


class PackedBlocks(torch.utils.data.Dataset):
    """Blocks visited in a fixed, seeded order: resuming skips the first steps and sees the same data.

    `mask_boundaries` (evaluation sets): no loss on a document's first token (it would be predicted
    from the previous document's EOS) nor on its EOS. The perplexity is then that of the text alone,
    as common.eval computes it, and cannot fall just because training teaches the model where
    documents end and what follows an EOS (measured on SmolLM2-Instruct with short general text:
    those two targets doubled the packed perplexity and made it fall 26% in a run that kept the
    text's perplexity flat).
    """

    def __init__(self, blocks: np.ndarray, order: np.ndarray | None = None, mask_boundaries: bool = False):
        self.blocks, self.mask_boundaries = blocks, mask_boundaries
        self.order = np.arange(len(blocks)) if order is None else order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[int(self.order[i])], "mask_boundaries": self.mask_boundaries}


class BlockCollator:
    """Stack equal-length blocks; labels are the inputs (the model shifts them).

    `separate` adds position_ids restarting after every EOS, which transformers turns into a
    block-diagonal mask, and then also drops the loss on each document's first token: with no
    access to the previous document it has no context at all (DataCollatorWithFlattening does the same).
    """

    def __init__(self, eos_id: int, separate: bool):
        self.eos_id, self.separate = eos_id, separate

    def __call__(self, rows: list) -> dict[str, torch.Tensor]:
        items = [r if isinstance(r, dict) else {"input_ids": r, "mask_boundaries": False} for r in rows]
        ids = torch.from_numpy(np.stack([np.asarray(r["input_ids"], dtype=np.int64) for r in items]))
        labels = ids.clone()
        mask = torch.tensor([self.separate or bool(r["mask_boundaries"]) for r in items])
        after_eos = torch.zeros_like(ids, dtype=torch.bool)
        after_eos[:, 1:] = ids[:, :-1] == self.eos_id
        labels[after_eos & mask[:, None]] = -100
        evaluation = torch.tensor([bool(r["mask_boundaries"]) for r in items])
        labels[(ids == self.eos_id) & evaluation[:, None]] = -100
        batch = {"input_ids": ids, "labels": labels}
        if self.separate:
            batch["position_ids"] = document_positions(ids, self.eos_id)
        return batch


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions counting from 0 at the start of each document (the token after an EOS) in each row."""
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    idx = torch.arange(ids.shape[1]).expand_as(ids)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


# =============================================================================================
# Plan: steps, tokens and a memory estimate from config.json alone
# =============================================================================================


def model_config(path: str):
    from transformers import AutoConfig

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: no config.json (a model folder in transformers format is needed)")
    try:
        return AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{p / 'config.json'}: cannot read ({str(exc).splitlines()[0][:120]})") from None


def max_positions(config) -> int | None:
    text_cfg = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(config, block_size: int, path: str) -> None:
    limit = max_positions(config)
    if limit is not None and block_size > limit:
        raise UserError(f"--block_size {block_size} is above the model's context ({limit} = max_position_embeddings of {path})")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def parameter_layout(config, cfg: Config) -> dict:
    """Parameter counts of the model built on the meta device (no memory, no weights) and of its LoRA."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if m is out_emb}
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in head_names]
    linear_params = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in linear)
    targets = list(cfg.lora_target_modules)
    chosen = linear if targets == ["all-linear"] else [(n, m) for n, m in linear if _matches(n, targets)]
    if not cfg.full_finetune and not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
        raise UserError(f"LoRA target_modules {targets} match no module of the model; linear layers here: {names}")
    lora = sum(cfg.lora_r * (m.in_features + m.out_features) for _, m in chosen)
    emb = model.get_input_embeddings().weight.numel()
    head = out_emb.weight.numel() if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight else 0
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd")
    heads = getattr(text_cfg, "num_attention_heads", None) or getattr(text_cfg, "n_head", 1)
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // heads
    del model
    return {
        "total": total, "linear": linear_params, "other": total - linear_params, "lora": lora,
        "lora_modules": len(chosen), "embeddings": emb, "lm_head": head,
        "layers": getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", 1),
        "hidden": hidden, "intermediate": getattr(text_cfg, "intermediate_size", None) or 4 * hidden,
        "kv_dim": kv_heads * head_dim, "vocab": getattr(text_cfg, "vocab_size", emb // hidden),
    }


GB = 1024**3


def memory_plan(layout: dict, cfg: Config, micro_batch: int, seq: int) -> dict:
    """Bytes for weights, trainable state and activations (estimates; see the printed notes).

    Weights: bitsandbytes quantizes every nn.Linear except the LM head; NF4 with double quantization
    costs 4.127 bits/param (4 + 8/64 + 32/(64*256)). Under QLoRA peft's prepare_model_for_kbit_training
    upcasts the unquantized rest (embeddings, head, norms) to fp32. Trainable parameters cost 16 bytes
    each (fp32 weight + grad + two AdamW moments). Activations per layer, 16-bit, sdpa/flash attention
    (no seq^2 term): (6h + 2kv + 5I) values per token, plus LoRA dropout copies of the adapted inputs;
    with gradient checkpointing only each layer's input (h per token) is kept plus one layer being
    recomputed. Logits: ~10 bytes per token per vocab entry (16-bit logits, fp32 copy and its grad).
    """
    P, lin, other = layout["total"], layout["linear"], layout["other"]
    weights_by_bits = {
        "4bit (NF4, double quant)": lin * 4.127 / 8 + other * 2,
        "8bit (LLM.int8)": lin * 1.0 + other * 2,
        "16bit (bf16)": P * 2.0,
        "32bit (fp32)": P * 4.0,
    }
    q = cfg.quant
    if cfg.full_finetune:
        weights, trainable = P * 4.0, P  # fp32 master weights, bf16 autocast
    else:
        if q == "4bit":
            weights = lin * 4.127 / 8 + other * 4.0
        elif q == "8bit":
            weights = lin * 1.0 + other * 4.0
        else:
            weights = P * 2.0
        trainable = layout["lora"] + (layout["embeddings"] + layout["lm_head"] if cfg.train_embeddings else 0)
        if cfg.train_embeddings:
            weights += (layout["embeddings"] + layout["lm_head"]) * 4.0  # trainable copies (modules_to_save)
    states = trainable * 16.0 - (trainable * 4.0 if cfg.full_finetune else 0)  # full FT: weight already counted
    h, I, kv, L, V = layout["hidden"], layout["intermediate"], layout["kv_dim"], layout["layers"], layout["vocab"]
    tokens = micro_batch * seq
    per_layer = tokens * (6 * h + 2 * kv + 5 * I) * 2
    if not cfg.full_finetune and cfg.lora_dropout > 0:
        per_layer += tokens * (6 * h + I) * 2  # dropout copies of the adapted layers' inputs
    logits = tokens * V * 10.0
    act_full = L * per_layer + logits
    act_ckpt = L * tokens * h * 2 + per_layer + logits
    activations = act_ckpt if cfg.gradient_checkpointing else act_full
    return {
        "weights_by_bits_gb": {k: v / GB for k, v in weights_by_bits.items()},
        "weights_gb": weights / GB, "trainable_params": trainable, "trainable_state_gb": states / GB,
        "activations_gb": activations / GB, "activations_no_ckpt_gb": act_full / GB, "activations_ckpt_gb": act_ckpt / GB,
        "total_gb": (weights + states + activations) / GB,
        "per_device_sharded_gb": {n: (weights + states) / n / GB + activations / GB for n in (1, 2, 4, 8)},
    }


def estimate_tokens(path: Path, tokenizer, sample: int = 2000) -> tuple[int, int, bool]:
    """(documents, tokens, exact?) of a jsonl file: exact when it has at most `sample` records, else
    the first `sample` records are tokenized and scaled up by file size. Without a tokenizer, tokens
    = UTF-8 bytes of text / 4 (about right for English and Chinese alike)."""
    size = path.stat().st_size
    docs, text_bytes, line_bytes, exact = 0, 0, 0, True
    texts = []
    loads = _loads()
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            if docs >= sample:
                exact = False
                break
            line_bytes += len(line)
            try:
                obj = loads(line)
            except ValueError:
                continue  # a plan survives a bad line; the real run names it
            text = obj.get("text") if isinstance(obj, dict) else None
            if isinstance(text, str) and text.strip():
                texts.append(text)
                text_bytes += len(text.encode())
            docs += 1
    if tokenizer is not None:
        extra = len(bos_prefix(tokenizer)) + 1
        tokens = sum(len(ids) + extra for ids in encode_docs(tokenizer, texts)) if texts else 0
    else:
        tokens, exact = text_bytes // 4 + len(texts), False
    if docs and line_bytes < size and docs >= sample:
        scale = size / line_bytes
        docs, tokens = int(docs * scale), int(tokens * scale)
    return docs, tokens, exact


def steps_for(cfg: Config, n_blocks: int, world: int) -> int:
    blocks_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    tokens_per_step = blocks_per_step * cfg.block_size
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_train_tokens:
        return max(1, cfg.max_train_tokens // tokens_per_step)
    return max(1, math.ceil(cfg.num_train_epochs * n_blocks / blocks_per_step))


def dry_run(cfg: Config, corpus_dir: Path | None, world: int) -> dict:
    config = model_config(cfg.model_name_or_path)
    check_block_size(config, cfg.block_size, cfg.model_name_or_path)
    layout = parameter_layout(config, cfg)
    tokenizer = None
    tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if any((Path(tok_path) / f).is_file() for f in tok_files):  # AutoTokenizer would build an empty one otherwise
        try:
            from common.modeling import load_tokenizer

            tokenizer = load_tokenizer(tok_path)
        except Exception as exc:  # a dry run still plans memory without a tokenizer
            log.warning("%s: tokenizer not loadable (%s); estimating tokens as bytes / 4", tok_path, str(exc).splitlines()[0][:100])
            tokenizer = None
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world * cfg.block_size
    data: dict[str, Any] = {}
    if corpus_dir is not None and (corpus_dir / "train.jsonl").is_file():
        docs, tokens, exact = estimate_tokens(corpus_dir / "train.jsonl", tokenizer)
        data = {"documents": docs, "tokens": tokens, "tokens_exact": exact, "blocks": tokens // cfg.block_size}
    n_blocks = data.get("blocks", 0)
    if cfg.replay_ratios and (cfg.max_steps or cfg.max_train_tokens or n_blocks):
        budget = cfg.max_train_tokens or (cfg.max_steps * tokens_per_step if cfg.max_steps else n_blocks * cfg.block_size)
        steps = max(1, budget // tokens_per_step)
    elif cfg.max_steps or cfg.max_train_tokens or n_blocks:
        steps = steps_for(cfg, n_blocks, world)
    else:
        steps = None
    mem = memory_plan(layout, cfg, cfg.batch_size, cfg.block_size)
    plan = {"model": cfg.model_name_or_path, "parameters": layout, "quantization": cfg.quant,
            "mode": "full fine-tune" if cfg.full_finetune else ("QLoRA" if cfg.quant != "none" else "LoRA"),
            "tokens_per_step": tokens_per_step, "steps": steps, "runs": max(1, len(cfg.replay_ratios)),
            "train_tokens": steps * tokens_per_step if steps else None, "data": data, "memory": mem,
            "tokenizer": str(tok_path) if tokenizer is not None else None}
    lines = [f"plan for {cfg.model_name_or_path} ({layout['total'] / 1e9:.2f}B parameters, {layout['layers']} layers, "
             f"hidden {layout['hidden']}, vocab {layout['vocab']}) — {plan['mode']}, quantization {cfg.quant}"]
    if data:
        how = "exact" if data["tokens_exact"] else ("estimated from a sample" if tokenizer is not None else "estimated as UTF-8 bytes / 4 (no tokenizer)")
        lines.append(f"data: {data['documents']:,} documents, {data['tokens']:,} tokens ({how}), {data['blocks']:,} blocks of {cfg.block_size}")
    else:
        lines.append("data: no corpus given (memory plan only)")
    lines.append(f"tokens/step: {tokens_per_step:,} = batch {cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} "
                 f"x {world} process(es) x block {cfg.block_size}")
    if steps:
        lines.append(f"steps: {steps:,} per run x {plan['runs']} run(s); {steps * tokens_per_step:,} training tokens per run")
    if not cfg.full_finetune:
        lines.append(f"LoRA r={cfg.lora_r} on {layout['lora_modules']} modules: {layout['lora']:,} parameters"
                     + (" + embeddings/head trained in full" if cfg.train_embeddings else ""))
    lines.append("memory estimate (GiB):")
    rows = [(f"weights at {k}", v) for k, v in mem["weights_by_bits_gb"].items()]
    rest = ", unquantized rest in fp32" if cfg.quant != "none" and not cfg.full_finetune else ""
    rows += [(f"chosen weights ({cfg.quant}{rest})", mem["weights_gb"]),
             (f"{mem['trainable_params']:,} trainable params: weight+grad+AdamW", mem["trainable_state_gb"]),
             (f"activations, micro-batch {cfg.batch_size} x {cfg.block_size}, no checkpointing", mem["activations_no_ckpt_gb"]),
             (f"activations, micro-batch {cfg.batch_size} x {cfg.block_size}, gradient checkpointing", mem["activations_ckpt_gb"]),
             (f"total on one device ({'with' if cfg.gradient_checkpointing else 'without'} gradient checkpointing)", mem["total_gb"])]
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}} {value:9.2f}" for label, value in rows]
    lines.append("  + CUDA context ~1 GiB and allocator slack ~10%; activations are an estimate (sdpa attention, 16-bit)")
    lines.append("  per device with FSDP/ZeRO-3 sharding: " + ", ".join(f"{n} dev {g:.1f}" for n, g in mem["per_device_sharded_gb"].items()))
    print("\n".join(lines), flush=True)
    plan["text"] = "\n".join(lines)
    return plan


# =============================================================================================
# Training: model, Trainer, callbacks (progress line, periodic evaluation, forgetting guard)
# =============================================================================================


def is_flag_env(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def load_train_model(cfg: Config, compute_dtype: torch.dtype, device: torch.device, local_rank: int):
    """Base model ready to train: QLoRA/LoRA via common.modeling, or full weights in fp32 (autocast does bf16)."""
    from common.modeling import add_lora, load_model, quantization_config

    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute_dtype]
    sharded = is_flag_env("ACCELERATE_USE_FSDP") or is_flag_env("ACCELERATE_USE_DEEPSPEED")
    if cfg.full_finetune:
        model = load_model(cfg.model_name_or_path, quantization="none", dtype="fp32", device="cpu")
    elif cfg.quant == "none":
        model = load_model(cfg.model_name_or_path, quantization="none", dtype=name, device="cpu")
    elif sharded:
        # FSDP/ZeRO-3 shard after loading: no device_map; quant storage = compute dtype (common.modeling).
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=compute_dtype,
                                                     quantization_config=quantization_config(cfg.quant, compute_dtype))
    else:
        device_map = {"": "cpu"} if device.type == "cpu" else {"": local_rank}
        model = load_model(cfg.model_name_or_path, quantization=cfg.quant, dtype=name, device=str(device), device_map=device_map)
    model.config.use_cache = False  # training; also required for the packed-sequence mask
    keep_4bit_trainable(model)
    if cfg.full_finetune:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if sharded and cfg.quant != "none":
        return sharded_qlora(model, cfg)
    return add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    target_modules=list(cfg.lora_target_modules), modules_to_save=embedding_modules(model, cfg),
                    gradient_checkpointing=cfg.gradient_checkpointing)


def sharded_qlora(model, cfg: Config):
    """LoRA on a 4-bit model that FSDP or ZeRO-3 will shard (as trl does for sharded QLoRA).

    FSDP flattens parameters of one dtype only, so nothing may be upcast: no
    prepare_model_for_kbit_training (it casts norms/embeddings to fp32) and adapter weights stay in
    the quant-storage dtype (autocast_adapter_dtype=False). Not exercised by the CPU tests.
    """
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = list(cfg.lora_target_modules)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      modules_to_save=embedding_modules(model, cfg))
    try:
        return get_peft_model(model, lcfg, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise UserError(f"LoRA target_modules {targets} match no module of the model ({str(exc).splitlines()[0][:120]})") from None


def embedding_modules(model, cfg: Config) -> list[str] | None:
    """Names of the input embedding and LM head (peft modules_to_save) when --train_embeddings."""
    if not cfg.train_embeddings:
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is emb or (head is not None and m is head)})


class QuietProgress(ProgressCallback):
    """Trainer's tqdm bar without its dict printout: our fixed-format line reports the logs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class CPTCallback(TrainerCallback):
    """Progress line + metrics.jsonl, training-only tokens/s, periodic perplexity and the forgetting guard.

    Periodic evaluation runs through Trainer.evaluate on packed validation blocks (so it is sharded and
    gathered correctly under DDP/FSDP/DeepSpeed): ppl = exp(eval loss). The guard compares the guard set's
    perplexity with the first evaluation (step 0, `eval_on_start`); the history is rebuilt from the
    trainer state's log history on resume, so the baseline survives interruptions.
    """

    def __init__(self, mlog: MetricsLogger, tokens_per_step: int, eval_names: list[str], guard_name: str | None,
                 max_degradation: float, action: str, fields: dict):
        self.mlog, self.tps, self.eval_names, self.guard_name = mlog, tokens_per_step, eval_names, guard_name
        self.max_degradation, self.action, self.fields = max_degradation, action, fields
        self.history: list[dict] = []
        self.triggered: dict | None = None
        self.train_time, self.steps_timed, self._mark = 0.0, 0, None
        self._last_log_step, self._last_log_time = 0, 0.0
        self._pending: dict[str, float] = {}

    # -- timing: an interval from the end of the last log/eval/save to the end of a step is training
    def _now(self):
        self._mark = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.history = self._history_from_state(state)
        self._last_log_step = state.global_step
        self._now()

    def on_step_end(self, args, state, control, **kw):
        if self._mark is not None:
            self.train_time += time.perf_counter() - self._mark
            self.steps_timed += 1
        self._now()

    def on_save(self, args, state, control, **kw):
        self._now()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs and state.is_world_process_zero:
            steps = state.global_step - self._last_log_step
            dt = self.train_time - self._last_log_time
            rec = {**self.fields, "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
                   "tok/s": steps * self.tps / dt if dt > 0 else float("nan")}
            if "grad_norm" in logs:
                rec["grad_norm"] = float(logs["grad_norm"])
            self.mlog.log(step=state.global_step, **rec)
            self._last_log_step, self._last_log_time = state.global_step, self.train_time
        self._now()

    # -- evaluation and guard
    def _history_from_state(self, state) -> list[dict]:
        by_step: dict[int, dict] = {}
        for entry in state.log_history:
            for name in self.eval_names:
                key = f"eval_{name}_loss"
                if key in entry:
                    by_step.setdefault(entry["step"], {"step": entry["step"]})[f"ppl_{name}"] = math.exp(entry[key])
        return [by_step[s] for s in sorted(by_step) if all(f"ppl_{n}" in by_step[s] for n in self.eval_names)]

    def general_rise(self, entry: dict) -> float | None:
        if not self.guard_name or not self.history:
            return None
        base = self.history[0][f"ppl_{self.guard_name}"]
        return entry[f"ppl_{self.guard_name}"] / base - 1.0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        for name in self.eval_names:
            key = f"eval_{name}_loss"
            if metrics and key in metrics:
                self._pending[name] = math.exp(min(float(metrics[key]), 50.0))
        if len(self._pending) < len(self.eval_names):
            self._now()
            return
        entry = {"step": state.global_step, **{f"ppl_{n}": self._pending[n] for n in self.eval_names}}
        self._pending = {}
        if not self.history or self.history[-1]["step"] != entry["step"]:
            self.history.append(entry)
        rise = self.general_rise(entry)
        entry["general_rise"] = rise
        if state.is_world_process_zero:
            shown = {f"ppl_{n}": entry[f"ppl_{n}"] for n in self.eval_names}
            self.mlog.log(step=state.global_step, **self.fields, **shown,
                          **({"general_rise": rise} if rise is not None else {}))
        if state.global_step > 0 and self.action == "rollback":
            control.should_save = True  # every evaluated step gets a checkpoint to roll back to
        if rise is not None and rise > self.max_degradation and self.triggered is None:
            self.triggered = {"step": state.global_step, "general_ppl": entry[f"ppl_{self.guard_name}"],
                              "baseline_ppl": self.history[0][f"ppl_{self.guard_name}"], "rise": rise,
                              "limit": self.max_degradation, "action": self.action, "set": self.guard_name}
            verb = {"stop": "stopping", "rollback": "stopping; rolling back to the best checkpoint", "warn": "continuing (warn)"}[self.action]
            log.warning("guard: general perplexity (%s) rose %.1f%% over the start (limit %.1f%%) at step %d: %s",
                        self.guard_name, 100 * rise, 100 * self.max_degradation, state.global_step, verb)
            if self.action != "warn":
                control.should_training_stop = True
        self._now()

    def best_step(self) -> int:
        """Rollback rule: among evaluations whose general rise is within the limit, the lowest domain perplexity."""
        ok = [e for e in self.history if (self.general_rise(e) or 0.0) <= self.max_degradation]
        if not ok:
            return 0
        key = "ppl_domain" if "domain" in self.eval_names else f"ppl_{self.eval_names[0]}"
        return min(ok, key=lambda e: (e[key], -e["step"]))["step"]


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def verify_checkpoint(ckpt: Path) -> None:
    """Refuse a truncated or corrupt checkpoint with one line naming it (before Trainer loads half of it)."""
    from safetensors import safe_open

    state = ckpt / "trainer_state.json"
    if not state.is_file():
        raise UserError(f"{ckpt}: corrupt checkpoint (trainer_state.json missing); delete it to resume from an earlier one")
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{ckpt}: corrupt checkpoint (trainer_state.json is not valid JSON); delete it to resume from an earlier one") from None
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights and not any(ckpt.glob("*.bin")) and not any(ckpt.glob("pytorch_model*")):
        raise UserError(f"{ckpt}: corrupt checkpoint (no model or adapter weights); delete it to resume from an earlier one")
    for f in weights:
        try:
            with safe_open(str(f), "pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error type for truncated files
            raise UserError(f"{ckpt}: corrupt checkpoint ({f.name}: {str(exc).splitlines()[0][:100]}); "
                            "delete it to resume from an earlier one") from None
    for f in list(ckpt.glob("*.pt")) + list(ckpt.glob("*.pth")):
        if not zipfile.is_zipfile(f):
            raise UserError(f"{ckpt}: corrupt checkpoint ({f.name} is truncated or not a torch file); "
                            "delete it to resume from an earlier one")


def training_args(cfg: Config, ckpt_dir: Path, max_steps: int, compute_dtype: torch.dtype, use_cpu: bool,
                  has_eval: bool, resuming: bool = False) -> TrainingArguments:
    no_bar = os.environ.get("DF_NO_PROGRESS") == "1"
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=int(math.ceil(cfg.warmup_ratio * max_steps)),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=max(1, cfg.log_every),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_every if has_eval else None,
        eval_on_start=has_eval and not resuming,  # a resumed run keeps its step-0 baseline in the log history
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        save_total_limit=cfg.save_total_limit,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=use_cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="sequential",  # the order is already a seeded shuffle (PackedBlocks)
        remove_unused_columns=False,
        dataloader_pin_memory=not use_cpu,
        ddp_find_unused_parameters=False,
        ddp_timeout=cfg.ddp_timeout,
        report_to="none",
        disable_tqdm=no_bar,
    )


def identity_adapter(cfg: Config, out_dir: Path) -> None:
    """An adapter equal to the base model (LoRA B = 0, modules_to_save = base copies): rollback to step 0."""
    from common.modeling import add_lora, load_model

    base = load_model(cfg.model_name_or_path, quantization="none", dtype="fp32", device="cpu")
    model = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=list(cfg.lora_target_modules), modules_to_save=embedding_modules(base, cfg))
    model.save_pretrained(str(out_dir))


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "config.json", "generation_config.json")


def restore_weights(ckpt: Path, dst: Path) -> None:
    """Replace the weights in `dst` with those of a Trainer checkpoint (adapter or full model)."""
    for f in list(dst.iterdir()):
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json" or f.name in WEIGHT_FILES:
            f.unlink()
    for f in ckpt.iterdir():
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json" or f.name in WEIGHT_FILES:
            shutil.copy2(f, dst / f.name)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def train_run(cfg: Config, ctx: dict, run_out: Path, blocks: np.ndarray, order: np.ndarray, max_steps: int,
              eval_sets: dict[str, np.ndarray], guard_name: str | None, tokenizer, mlog: MetricsLogger,
              fields: dict, data_key: str, extra_callbacks=()) -> dict:
    """Train one model on `blocks` visited in `order`; write `<run_out>/adapter` (or `model` for full FT)."""
    ckpt_dir = run_out / "checkpoints"
    resume_from = None
    if cfg.resume:
        resume_from = last_checkpoint(ckpt_dir)
        if resume_from is not None:
            verify_checkpoint(resume_from)
            plan_file = ckpt_dir / "data.json"
            if plan_file.is_file() and json.loads(plan_file.read_text())["data_key"] != data_key:
                raise UserError(f"{ckpt_dir}: the training data or settings changed since these checkpoints were "
                                "written; resume with the same corpus and flags, or pass --overwrite")
            log.info("resuming from %s", resume_from)
        else:
            log.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
    if ctx["is_main"]:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ckpt_dir / "data.json", {"data_key": data_key, "max_steps": max_steps})

    seed_everything(cfg.seed)
    has_eval = bool(eval_sets) and cfg.eval_every > 0
    args = training_args(cfg, ckpt_dir, max_steps, ctx["compute_dtype"], ctx["use_cpu"], has_eval, resume_from is not None)
    model = load_train_model(cfg, ctx["compute_dtype"], ctx["device"], ctx["local_rank"])
    collate = BlockCollator(tokenizer.eos_token_id, cfg.packing_attention == "separate")
    names = list(eval_sets)
    if guard_name in names:  # the guard's set last: one progress line per evaluation, once all sets are in
        names = [n for n in names if n != guard_name] + [guard_name]
    cb = CPTCallback(mlog, ctx["tokens_per_step"], names if has_eval else [], guard_name if has_eval else None,
                     cfg.max_general_degradation, cfg.guard_action, fields)
    trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(blocks, order),
                      eval_dataset={n: PackedBlocks(eval_sets[n], mask_boundaries=True) for n in names} if has_eval else None,
                      data_collator=collate, callbacks=[cb, *extra_callbacks])
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    if not args.disable_tqdm:
        trainer.add_callback(QuietProgress)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # Save the final weights: Trainer.save_model gathers FSDP/ZeRO-3 shards and writes on rank 0 only.
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    artifact = run_out / ("model" if cfg.full_finetune else "adapter")
    tmp = run_out / f".{artifact.name}.tmp"
    if ctx["is_main"] and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    rolled_back_to = None
    if ctx["is_main"]:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        if cfg.full_finetune:
            tokenizer.save_pretrained(str(tmp))
        if cb.triggered and cfg.guard_action == "rollback":
            rolled_back_to = cb.best_step()
            src = ckpt_dir / f"checkpoint-{rolled_back_to}"
            if rolled_back_to == trainer.state.global_step:
                pass  # the final weights are the best ones
            elif rolled_back_to > 0 and src.is_dir():
                restore_weights(src, tmp)
            else:
                if rolled_back_to > 0:
                    log.warning("guard: checkpoint-%d is gone (save_total_limit?); rolling back to the base model", rolled_back_to)
                rolled_back_to = 0
                shutil.rmtree(tmp)
                if cfg.full_finetune:
                    from common.modeling import load_model

                    load_model(cfg.model_name_or_path, quantization="none", dtype="fp32", device="cpu").save_pretrained(str(tmp))
                    tokenizer.save_pretrained(str(tmp))
                else:
                    identity_adapter(cfg, tmp)
            log.info("guard: rolled back to step %d (lowest domain perplexity among evaluations within the limit)", rolled_back_to)
        _replace_dir(tmp, artifact)
    ctx["state"].wait_for_everyone()

    steps = int(trainer.state.global_step)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "steps": steps, "max_steps": max_steps, "tokens": steps * ctx["tokens_per_step"],
        "tokens_per_s": cb.steps_timed * ctx["tokens_per_step"] / cb.train_time if cb.train_time > 0 else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "periodic_eval": cb.history,
        "guard": {"set": cb.guard_name, "limit": cfg.max_general_degradation, "action": cfg.guard_action,
                  "triggered": cb.triggered is not None, "event": cb.triggered, "rolled_back_to_step": rolled_back_to},
        "artifact": artifact.name,
    }
    del trainer, model
    gc.collect()
    return summary


# =============================================================================================
# Before/after evaluation through common.eval
# =============================================================================================


def _first_record(path: Path) -> dict | None:
    for _, obj in iter_jsonl(path):
        return obj
    return None


def eval_plan(corpus_dir: Path, domain_prefixes: list[str] = ("domain",)) -> tuple[dict[str, dict], dict[str, Path]]:
    """Tasks for common.eval.evaluate_model, each with a role, and the periodic-eval text files.

    Roles: domain (domain gain), general (independent general text or benchmarks: retention),
    general_replay (held-out text of the replayed general sources: shown, but cannot show forgetting).
    """
    tasks: dict[str, dict] = {
        "domain_ppl": {"type": "ppl", "path": corpus_dir / "validation_domain.jsonl", "role": "domain"},
        "general_ppl": {"type": "ppl", "path": corpus_dir / "validation_general.jsonl", "role": "general_replay"},
    }
    for name, t in tasks.items():
        if not t["path"].is_file():
            raise UserError(f"{t['path']}: no such file (01_corpus writes it)")
    independent: list[Path] = []
    eval_dir = corpus_dir / "eval"
    for path in sorted(eval_dir.glob("*.jsonl")) if eval_dir.is_dir() else []:
        first = _first_record(path)
        if first is None:
            continue
        keys = {str(k).strip().lower() if len(str(k).strip()) > 1 else str(k).strip().upper() for k in first}
        role = "domain" if any(path.stem.startswith(p) for p in domain_prefixes if p) else "general"
        if {"question", "answer", "A", "B"} <= keys:
            tasks[path.stem] = {"type": "mcq", "path": path, "role": role}
        elif "text" in keys:
            tasks[path.stem] = {"type": "ppl", "path": path, "role": role}
            if path.stem.startswith("general_ppl"):
                independent.append(path)
        else:
            log.info("eval/%s: not an MCQ or text set (chat records are evaluated by stage 03); skipped", path.name)
    periodic = {"domain": corpus_dir / "validation_domain.jsonl", "general": corpus_dir / "validation_general.jsonl"}
    for i, p in enumerate(independent):
        periodic["general_independent" if i == 0 else f"general_independent_{i}"] = p
    return tasks, periodic


def headline_general(tasks: dict[str, dict]) -> str:
    """The general-retention task: independent general text when present, else the replay-source hold-out."""
    for name, t in tasks.items():
        if t["type"] == "ppl" and t["role"] == "general":
            return name
    return "general_ppl"


def run_eval(model, tokenizer, tasks: dict[str, dict], cfg: Config, n_params: int, max_len: int) -> dict:
    from common.eval import evaluate_model

    score = cfg.mcq_score if cfg.mcq_score != "auto" else ("option" if n_params < 1_000_000_000 else "letter")
    specs = {}
    for name, t in tasks.items():
        spec = {"type": t["type"], "path": str(t["path"]), "limit": cfg.eval_limit or None, "batch_size": cfg.eval_batch_size}
        if t["type"] == "ppl":
            spec["max_length"] = max_len
        else:
            spec["score"] = score
        specs[name] = spec
    progress = os.environ.get("DF_NO_PROGRESS") != "1"
    results = evaluate_model(model, tokenizer, specs, progress=progress)
    for r in results.values():
        r.pop("samples", None)
    return results


def load_eval_model(cfg: Config, path: str, adapter: Path | None = None):
    from common.modeling import load_model

    device = resolve_device(cfg.device)
    kwargs = {"device_map": "auto"} if device.type == "cuda" else {}
    model = load_model(path, quantization="none", dtype=cfg.dtype, device=cfg.device, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model


def compare(tasks: dict[str, dict], before: dict, after: dict) -> dict:
    from common.eval import domain_gain, retention

    ret, gain = {}, {}
    for name, t in tasks.items():
        if name not in before or name not in after:
            continue
        metric, kind = ("ppl", "ppl") if t["type"] == "ppl" else ("acc", "acc")
        value = (retention if t["role"] != "domain" else domain_gain)(before[name][metric], after[name][metric], kind)
        (gain if t["role"] == "domain" else ret)[name] = value
    head = headline_general(tasks)
    return {"retention": ret, "domain_gain": gain,
            "general_retention": ret.get(head), "general_retention_task": head,
            "domain_ppl_gain": gain.get("domain_ppl")}


# =============================================================================================
# Replay sweep
# =============================================================================================


def pick_ratio(rows: list[dict], max_degradation: float) -> tuple[dict, str]:
    """Rule: the lowest domain perplexity among ratios whose general retention is >= 1 - max_degradation;
    if none qualifies, the highest general retention."""
    ok = [r for r in rows if r.get("general_retention") is not None and r["general_retention"] >= 1 - max_degradation]
    if ok:
        best = min(ok, key=lambda r: (r["domain_ppl_after"], r["ratio"]))
        return best, (f"lowest domain perplexity among ratios keeping general retention >= {1 - max_degradation:.2f} "
                      f"({len(ok)} of {len(rows)} qualify)")
    best = max(rows, key=lambda r: (r.get("general_retention") or 0.0, -r["ratio"]))
    return best, f"no ratio kept general retention >= {1 - max_degradation:.2f}: highest general retention"


def sweep_table(rows: list[dict], picked: float, rule: str, before: dict | None, head: str) -> str:
    lines = ["# Replay-ratio sweep", "",
             f"Equal token budget per ratio; general retention measured on `{head}`. Pick: {rule}.", ""]
    if before:
        lines.append(f"Base model: domain ppl {before['domain_ppl']['ppl']:.3f}, {head} ppl {before[head]['ppl']:.3f}.")
        lines.append("")
    mcq = sorted({k for r in rows for k in r.get("mcq_after", {})})
    header = ["replay ratio", "general share", "steps", "tokens", "domain ppl", f"{head} ppl", "general retention",
              "domain gain", *[f"{m} acc" for m in mcq], "guard", "picked"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [f"{r['ratio']:.2f}", f"{r['general_share']:.3f}", str(r["steps"]), f"{r['tokens']:,}",
                 _f(r["domain_ppl_after"]), _f(r["general_ppl_after"]), _f(r.get("general_retention")),
                 _f(r.get("domain_gain")), *[_f(r.get("mcq_after", {}).get(m)) for m in mcq],
                 "triggered" if r["guard_triggered"] else "-", "**yes**" if r["ratio"] == picked else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_safe(obj):
    """NaN/inf (e.g. a retention whose 'before' was 0) as null: eval.json and the manifest stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _f(v, nd: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def sweep_plot(rows: list[dict], before: dict | None, head: str, path: Path, picked: float | None = None,
               min_retention: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r["ratio"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ratios, [r["domain_ppl_after"] for r in rows], "o-", label="domain ppl (after)")
    a1.plot(ratios, [r["general_ppl_after"] for r in rows], "s-", label=f"{head} ppl (after)")
    if before:
        a1.axhline(before["domain_ppl"]["ppl"], ls="--", c="C0", alpha=0.5, label="domain ppl (base)")
        a1.axhline(before[head]["ppl"], ls="--", c="C1", alpha=0.5, label=f"{head} ppl (base)")
    a1.set_xlabel("replay ratio (general share of tokens)")
    a1.set_ylabel("perplexity")
    a1.legend(fontsize=7)
    a1.set_title("perplexity by replay ratio")
    xs = [r.get("general_retention") or float("nan") for r in rows]
    ys = [r.get("domain_gain") or float("nan") for r in rows]
    a2.plot(xs, ys, "o")
    for r, x, y in zip(rows, xs, ys):
        a2.annotate(f"{r['ratio']:.2f}" + (" (picked)" if r["ratio"] == picked else ""), (x, y),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
        if r["ratio"] == picked:
            a2.plot([x], [y], "o", ms=12, mfc="none", mec="C3")
    if min_retention is not None:
        a2.axvline(min_retention, ls="--", c="C3", alpha=0.6, label=f"retention >= {min_retention:.2f} required")
        a2.legend(fontsize=7)
    a2.set_xlabel(f"general retention ({head})")
    a2.set_ylabel("domain gain (ppl before / after)")
    a2.set_title("general vs domain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =============================================================================================
# main
# =============================================================================================


def _report(cfg: Config, out: Path, eval_doc: dict, runs: list[dict], data_info: dict) -> str:
    summary = eval_doc.get("summary", {})
    lines = ["# 02 continual pre-training", "",
             f"Base `{cfg.model_name_or_path}`, {'full fine-tune' if cfg.full_finetune else f'LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}'}, "
             f"quantization {cfg.quant}, block {cfg.block_size}, packing attention `{cfg.packing_attention}`, lr {cfg.learning_rate}.", ""]
    lines.append(f"Training data: {data_info.get('documents', 0):,} documents, {data_info.get('tokens', 0):,} tokens in train.jsonl "
                 f"(general share {data_info.get('general_share', 0):.3f}).")
    for r in runs:
        lines.append(f"- run {r.get('name', 'main')}: {r['steps']} steps, {r['tokens']:,} tokens, "
                     f"{_f(r.get('tokens_per_s'), 0)} tok/s, loss {_f(r.get('first_loss'))} -> {_f(r.get('last_loss'))}, "
                     f"guard {'TRIGGERED at step ' + str(r['guard']['event']['step']) if r['guard']['triggered'] else 'not triggered'}")
    if eval_doc.get("before"):
        lines += ["", "| task | role | metric | before | after | ratio |", "|---|---|---|---|---|---|"]
        tasks = eval_doc["tasks"]
        for name, t in tasks.items():
            metric = "ppl" if t["type"] == "ppl" else "acc"
            b, a = eval_doc["before"].get(name, {}).get(metric), eval_doc["after"].get(name, {}).get(metric)
            ratio = eval_doc["retention"].get(name, eval_doc["domain_gain"].get(name))
            lines.append(f"| {name} | {t['role']} | {metric} | {_f(b)} | {_f(a)} | {_f(ratio)} |")
        lines += ["", f"General retention ({summary.get('general_retention_task')}): {_f(summary.get('general_retention'))}; "
                  f"domain perplexity gain: {_f(summary.get('domain_ppl_gain'))}.",
                  "Retention = before/after for perplexity, after/before for accuracy (>1: improved). "
                  "`general_replay` text comes from the replayed sources and cannot show forgetting."]
    if eval_doc.get("sweep"):
        lines += ["", f"Replay sweep: picked ratio {eval_doc['sweep']['picked_ratio']} ({eval_doc['sweep']['rule']}); see sweep/sweep.md."]
    return "\n".join(lines) + "\n"


def check_nonempty(path: Path) -> None:
    """One clear line for a missing or empty split, checked before the output folder is created."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (01_corpus writes it)")
    for _, obj in iter_jsonl(path):
        if isinstance(obj.get("text"), str) and obj["text"].strip():
            return
    raise UserError(f"{path}: empty split (no documents with text)")


def prepare_data(cfg: Config, ctx: dict, corpus_dir: Path, out: Path, cache_dir: Path, periodic_files: dict[str, Path]):
    """Tokenize (cached), then one run spec per replay ratio (resampled) or one for 01's mixture as is."""
    state, is_main, world = ctx["state"], ctx["is_main"], ctx["state"].num_processes
    tokenizer = ctx["tokenizer"]

    # 1. tokenize (rank 0 first, writing the cache; the others read it)
    with state.main_process_first():
        docs = tokenize_file(corpus_dir / "train.jsonl", tokenizer, cache_dir, cfg.general_source_patterns, write_cache=True)
        eval_sets = {name: eval_blocks(p, tokenizer, cfg.block_size, cfg.eval_docs, cfg.general_source_patterns)
                     for name, p in periodic_files.items()} if cfg.eval_every else {}
    if len(docs) == 0:
        raise UserError(f"{corpus_dir / 'train.jsonl'}: empty split (no documents with text)")
    lengths = docs.lengths
    data_info = {"documents": len(docs), "tokens": int(lengths.sum()),
                 "general_share": float(lengths[docs.kinds == KIND_GENERAL].sum() / max(1, lengths.sum())),
                 "kind_assumption": ("field 'kind'" if docs.stats["kind_from_source"] == 0 else
                                     f"{docs.stats['kind_from_source']} records without 'kind': general if source contains "
                                     f"{cfg.general_source_patterns}, else domain"),
                 **{k: v for k, v in docs.stats.items()}}
    log.info("train.jsonl: %d documents, %d tokens, general share %.3f", data_info["documents"], data_info["tokens"], data_info["general_share"])
    blocks_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world

    # 2. what to train: 01's mixture as is, or one run per replay ratio at an equal token budget
    runs_spec = []
    sweep = len(cfg.replay_ratios) > 1
    if cfg.replay_ratios:
        budget = cfg.max_train_tokens or (cfg.max_steps * ctx["tokens_per_step"] if cfg.max_steps else data_info["tokens"])
        steps = max(1, budget // ctx["tokens_per_step"])
        for ratio in cfg.replay_ratios:
            order_docs, achieved = resample_by_tokens(docs, ratio, steps * ctx["tokens_per_step"] + cfg.block_size, cfg.seed)
            blocks = cached_blocks(docs, order_docs, cfg.block_size, cache_dir, f"r{ratio}", write_cache=is_main)
            need = steps * blocks_per_step
            if len(blocks) < need:
                raise UserError(f"replay ratio {ratio}: packed {len(blocks)} blocks, need {need}")
            order = np.random.default_rng(cfg.seed).permutation(need)
            name = f"ratio_{ratio:g}"
            runs_spec.append({"name": name, "ratio": ratio, "blocks": blocks, "order": order, "steps": steps, "achieved": achieved,
                              "dir": out / "sweep" / name if sweep else out})
    else:
        doc_order = np.random.default_rng(cfg.seed).permutation(len(docs))
        blocks = cached_blocks(docs, doc_order, cfg.block_size, cache_dir, "mix", write_cache=is_main)
        if len(blocks) < blocks_per_step:
            raise UserError(f"{corpus_dir / 'train.jsonl'}: {data_info['tokens']} tokens make {len(blocks)} blocks of "
                            f"{cfg.block_size}; one step needs {blocks_per_step} (lower --block_size or --batch_size)")
        steps = steps_for(cfg, len(blocks), world)
        need = steps * blocks_per_step
        rng = np.random.default_rng(cfg.seed)
        order = np.concatenate([rng.permutation(len(blocks)) for _ in range(math.ceil(need / len(blocks)))])[:need]
        runs_spec.append({"name": "main", "ratio": None, "blocks": blocks, "order": order, "steps": steps,
                          "achieved": {"general_share": data_info["general_share"]}, "dir": out})
    return docs, eval_sets, data_info, runs_spec, sweep


def main(cfg: Config, extra_callbacks=()) -> dict:
    """Run the stage; returns the manifest (or the plan with --dry_run). `extra_callbacks` go to Trainer."""
    cfg.validate()
    set_threads(cfg.threads)
    from accelerate import PartialState

    device = resolve_device(cfg.device)
    use_cpu = device.type == "cpu"
    corpus_dir = resolve_input(cfg.corpus_dir, cfg.run_dir, "01_corpus", "corpus_dir") if (cfg.corpus_dir or cfg.run_dir) else None
    if cfg.dry_run:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return dry_run(cfg, corpus_dir, world)
    if corpus_dir is None:
        raise UserError("give --corpus_dir or --run_dir (then it is read from <run_dir>/01_corpus)")
    out = resolve_output_dir(cfg.output_dir, cfg.run_dir, "02_cpt")
    state = PartialState(cpu=use_cpu, timeout=_dt.timedelta(seconds=cfg.ddp_timeout))
    is_main, world = state.is_main_process, state.num_processes
    if not is_main:
        log.setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
    compute_dtype = resolve_dtype(cfg.dtype, device)
    ctx = {"state": state, "is_main": is_main, "device": device, "use_cpu": use_cpu, "local_rank": state.local_process_index,
           "compute_dtype": compute_dtype,
           "tokens_per_step": cfg.batch_size * cfg.gradient_accumulation_steps * world * cfg.block_size}

    # Cheap checks before touching the output folder.
    config = model_config(cfg.model_name_or_path)
    check_block_size(config, cfg.block_size, cfg.model_name_or_path)
    from common.modeling import load_tokenizer

    tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = load_tokenizer(tok_path)
    check_tokenizer(tokenizer, tok_path)
    ctx["tokenizer"] = tokenizer
    if cfg.guard_action == "rollback" and cfg.eval_every == 0:
        raise UserError("--guard_action rollback needs periodic evaluation (--eval_every > 0)")
    load_upstream(corpus_dir)  # refuse an unfinished 01 before creating anything
    tasks, periodic_files = eval_plan(corpus_dir, cfg.domain_eval_prefixes)
    for split in [corpus_dir / "train.jsonl", *periodic_files.values()]:
        check_nonempty(split)
    guard_name = "general_independent" if "general_independent" in periodic_files else "general"

    with state.main_process_first():
        run = StageRun("02_cpt", out, cfg, overwrite=cfg.overwrite, resume=cfg.resume, is_main_process=is_main)
        run.add_input("corpus", corpus_dir, upstream=True)
        run.add_input("base_model", cfg.model_name_or_path)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    mlog = MetricsLogger(out / "metrics.jsonl", logger=log, enabled=is_main)
    try:
        docs, eval_sets, data_info, runs_spec, sweep = prepare_data(cfg, ctx, corpus_dir, out, cache_dir, periodic_files)
    except UserError:
        if is_main and not cfg.resume:
            shutil.rmtree(out, ignore_errors=True)  # StageRun found it empty: leave nothing half-made behind
        raise
    blocks_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    state.wait_for_everyone()

    # 3. the base model's scores (rank 0; cached for --resume)
    max_len = min(1024, max_positions(config) or 1024)
    n_params = None
    before = None
    before_file = out / ".eval_before.json"
    if cfg.eval_before_after and is_main:
        if cfg.resume and before_file.is_file():
            before = json.loads(before_file.read_text())
        else:
            log.info("evaluating the base model (%d tasks, up to %d items each)", len(tasks), cfg.eval_limit)
            base = load_eval_model(cfg, cfg.model_name_or_path)
            n_params = sum(p.numel() for p in base.parameters())
            before = run_eval(base, tokenizer, tasks, cfg, n_params, max_len)
            atomic_write_json(before_file, before)
            del base
            gc.collect()
    state.wait_for_everyone()

    # 4. train each run, then (rank 0) evaluate it
    results = []
    for spec in runs_spec:
        run_out = spec["dir"]
        done_file = run_out / "eval.json"
        if sweep and cfg.resume and done_file.is_file():
            log.info("sweep: %s already finished, reusing it", spec["name"])
            results.append(json.loads(done_file.read_text())["run"])
            continue
        if is_main:
            run_out.mkdir(parents=True, exist_ok=True)
        data_key = f"{docs.source.name}:{file_fingerprint(docs.source)}:{tokenizer_fingerprint(tokenizer)}:{cfg.block_size}:" \
                   f"{cfg.seed}:{spec['ratio']}:{spec['steps']}:{blocks_per_step}:{cfg.packing_attention}"
        fields = {"replay_ratio": spec["ratio"]} if sweep else {}
        log.info("run %s: %d steps x %d tokens/step = %d tokens (general share %.3f)", spec["name"], spec["steps"],
                 ctx["tokens_per_step"], spec["steps"] * ctx["tokens_per_step"], spec["achieved"]["general_share"])
        summary = train_run(cfg, ctx, run_out, spec["blocks"], spec["order"], spec["steps"], eval_sets, guard_name,
                            tokenizer, mlog, fields, data_key, extra_callbacks)
        summary.update(name=spec["name"], ratio=spec["ratio"], achieved=spec["achieved"])
        if is_main and cfg.eval_before_after:
            artifact = run_out / summary["artifact"]
            model = load_eval_model(cfg, str(artifact)) if cfg.full_finetune else load_eval_model(cfg, cfg.model_name_or_path, artifact)
            n_params = n_params or sum(p.numel() for p in model.parameters())
            summary["after"] = run_eval(model, tokenizer, tasks, cfg, n_params, max_len)
            summary["compare"] = compare(tasks, before, summary["after"])
            del model
            gc.collect()
        if is_main and sweep:
            atomic_write_json(done_file, {"run": summary})
        results.append(summary)
        state.wait_for_everyone()

    # 5. pick (sweep), merge, write eval.json / report / manifest (rank 0)
    head = headline_general(tasks)
    sweep_doc = None
    final = results[0]
    if sweep and is_main:
        rows = []
        for r in results:
            comp = r.get("compare", {})
            rows.append({"ratio": r["ratio"], "general_share": r["achieved"]["general_share"], "steps": r["steps"], "tokens": r["tokens"],
                         "domain_ppl_after": r.get("after", {}).get("domain_ppl", {}).get("ppl", float("nan")),
                         "general_ppl_after": r.get("after", {}).get(head, {}).get("ppl", float("nan")),
                         "general_retention": comp.get("general_retention"), "domain_gain": comp.get("domain_ppl_gain"),
                         "mcq_after": {k: v["acc"] for k, v in r.get("after", {}).items() if tasks.get(k, {}).get("type") == "mcq"},
                         "guard_triggered": r["guard"]["triggered"]})
        best, rule = pick_ratio(rows, cfg.max_general_degradation)
        final = next(r for r in results if r["ratio"] == best["ratio"])
        (out / "sweep").mkdir(exist_ok=True)
        atomic_write_text(out / "sweep" / "sweep.md", sweep_table(rows, best["ratio"], rule, before, head))
        sweep_plot(rows, before, head, out / "sweep" / "sweep.png", best["ratio"], 1 - cfg.max_general_degradation)
        src = out / "sweep" / final["name"] / final["artifact"]
        dst = out / final["artifact"]
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        sweep_doc = {"rows": rows, "picked_ratio": best["ratio"], "rule": rule}
        log.info("sweep: picked replay ratio %s (%s)", best["ratio"], rule)

    manifest = {}
    if is_main:
        if not cfg.full_finetune:
            from common.modeling import merge_adapter

            merge_adapter(cfg.model_name_or_path, out / "adapter", out / "model", dtype="fp32", tokenizer=tokenizer)
        eval_doc: dict[str, Any] = {
            "tasks": {k: {"type": t["type"], "path": str(t["path"]), "role": t["role"]} for k, t in tasks.items()},
            "before": before or {}, "after": final.get("after", {}),
            "retention": final.get("compare", {}).get("retention", {}),
            "domain_gain": final.get("compare", {}).get("domain_gain", {}),
            "summary": {k: v for k, v in final.get("compare", {}).items() if k not in ("retention", "domain_gain")},
            "guard": final["guard"], "periodic_eval": final["periodic_eval"],
            "periodic_eval_note": "ppl = exp(Trainer eval loss) on packed validation blocks (first "
                                  f"{cfg.eval_docs} documents per set, scoring text tokens only: no document's first token, no EOS); "
                                  f"the guard watches '{final['guard']['set']}'",
            "training": {k: final[k] for k in ("steps", "max_steps", "tokens", "tokens_per_s", "first_loss", "last_loss", "ratio", "achieved")},
        }
        if sweep_doc:
            eval_doc["sweep"] = sweep_doc
        eval_doc = json_safe(eval_doc)
        atomic_write_json(out / "eval.json", eval_doc)
        atomic_write_text(out / "report.md", _report(cfg, out, eval_doc, results, data_info))
        if not cfg.keep_checkpoints:
            for r in runs_spec:
                shutil.rmtree(r["dir"] / "checkpoints", ignore_errors=True)
            if not cfg.cache_dir:
                shutil.rmtree(cache_dir, ignore_errors=True)
        before_file.unlink(missing_ok=True)
        b, a, comp = before or {}, final.get("after", {}), final.get("compare", {})
        metrics = {
            "ppl_domain_before": b.get("domain_ppl", {}).get("ppl"), "ppl_domain_after": a.get("domain_ppl", {}).get("ppl"),
            "ppl_general_before": b.get(head, {}).get("ppl"), "ppl_general_after": a.get(head, {}).get("ppl"),
            "general_retention": comp.get("general_retention"), "general_retention_task": head,
            "domain_gain": comp.get("domain_ppl_gain"),
            "tokens": final["tokens"], "tokens_per_s": final["tokens_per_s"], "steps": final["steps"],
            "train_documents": data_info["documents"], "train_tokens_available": data_info["tokens"],
            "replay_ratio": final["ratio"], "general_share": final["achieved"]["general_share"],
            "guard_triggered": final["guard"]["triggered"], "first_loss": final["first_loss"], "last_loss": final["last_loss"],
        }
        outputs = {"model": "model", "eval": "eval.json", "metrics": "metrics.jsonl", "report": "report.md"}
        if not cfg.full_finetune:
            outputs["adapter"] = "adapter"
        if sweep_doc:
            outputs.update(sweep_table="sweep/sweep.md", sweep_plot="sweep/sweep.png")
        manifest = run.finish(outputs=outputs, metrics=json_safe(metrics),
                              extra={"data": data_info, "world_size": world, "guard": final["guard"]})
        log.info("done: %s (domain ppl %s -> %s, general retention %s)", out, _f(metrics["ppl_domain_before"]),
                 _f(metrics["ppl_domain_after"]), _f(metrics["general_retention"]))
    state.wait_for_everyone()
    return manifest


if __name__ == "__main__":
    run_main(main, Config)
