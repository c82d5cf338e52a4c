"""Stage 02 (continual pre-training) on a tiny random Llama and a fake 01_corpus folder."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import make_config
from common.errors import UserError
from common.run import StageRun, load_script

ROOT = Path(__file__).resolve().parents[1]

DOMAIN = ["The court shall hear the case within thirty days.", "国家出资企业 国有资产 监督管理 公司 法律",
          "中华人民共和国企业国有资产法 第一条 为了维护国家基本经济制度。", "The company shall report state assets to the regulator."]
GENERAL = ["The quick brown fox jumps over the lazy dog.", "Wikipedia is a free encyclopedia.",
           "人民日报 新华社 北京 一月 报道 经济 发展", "What is the capital of France? Paris is the capital of France."]


cpt = load_script(ROOT / "02_continual_pretrain.py", "continual_pretrain")


def _write(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_corpus(root: Path, seed: int = 0, n: int = 60, train=None, val_domain=None) -> Path:
    """A complete 01_corpus folder: train (kind domain/general), validation splits, an independent
    general text set and an MCQ set, with its manifest written by StageRun as 01 does."""
    rng = random.Random(seed)

    def doc(pool, k=3):
        return " ".join(rng.choice(pool) for _ in range(k))

    run = StageRun("01_corpus", root, None, overwrite=True)
    if train is None:
        train = [{"text": doc(DOMAIN), "kind": "domain", "copy": 0} for _ in range(n)]
        train += [{"text": doc(GENERAL), "kind": "general", "copy": 0} for _ in range(n)]
        rng.shuffle(train)
    _write(root / "train.jsonl", train)
    _write(root / "validation_domain.jsonl", val_domain if val_domain is not None else [{"text": doc(DOMAIN)} for _ in range(8)])
    _write(root / "validation_general.jsonl", [{"text": doc(GENERAL)} for _ in range(8)])
    _write(root / "eval" / "general_ppl_news.jsonl",
           [{"text": "Breaking news: the market rose today. " + doc(GENERAL[:2], 2)} for _ in range(6)])
    _write(root / "eval" / "piqa.jsonl", [
        {"question": "Which is a city?", "A": "Paris", "B": "fox", "answer": "A"},
        {"question": "Which animal jumps?", "A": "court", "B": "fox", "answer": "B"},
        {"question": "Who hears the case?", "A": "the court", "B": "the dog", "answer": "A"}])
    _write(root / "eval" / "law_mcq.jsonl", [
        {"question": "国家出资企业由谁监督管理?", "A": "国有资产监督管理机构", "B": "新华社", "C": "人民日报", "answer": "A"},
        {"question": "Who shall hear the case?", "A": "the fox", "B": "the court", "C": "Paris", "answer": "B"}])
    run.finish(outputs={"train": "train.jsonl"}, metrics={})
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("01_corpus"))


def config(model_dir, corpus_dir, out, **kw):
    values = {"model_name_or_path": str(model_dir), "corpus_dir": str(corpus_dir), "output_dir": str(out),
              "block_size": 32, "batch_size": 2, "max_steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1,
              "learning_rate": 1e-2, "eval_limit": 20, "eval_docs": 8, "lora_r": 8, "lora_alpha": 16, "seed": 0}
    values.update(kw)
    return make_config(cpt.Config, values)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# packing


def test_packing_has_no_padding_and_eos_between_documents(tiny_model_dir, corpus, tmp_path, tiny_tokenizer):
    docs = cpt.tokenize_file(corpus / "train.jsonl", tiny_tokenizer, tmp_path, ["general"])
    assert len(docs) == 120 and set(np.unique(docs.kinds)) == {0, 1}
    eos = tiny_tokenizer.eos_token_id
    # every document ends with exactly one EOS; the text itself never encodes to EOS
    ends = docs.offsets[1:] - 1
    assert (np.asarray(docs.tokens)[ends] == eos).all()
    assert int((np.asarray(docs.tokens) == eos).sum()) == len(docs)
    order = np.random.default_rng(0).permutation(len(docs))
    blocks = cpt.pack_blocks(docs, order, 32)
    total = int(docs.lengths.sum())
    assert blocks.shape == (total // 32, 32)
    # the blocks are the concatenated stream, cut: 100% real tokens, only the final remainder dropped
    stream = np.concatenate([np.asarray(docs.tokens[docs.offsets[i]:docs.offsets[i + 1]]) for i in order])
    assert np.array_equal(blocks.reshape(-1), stream[: blocks.size])
    assert total - blocks.size < 32
    # cached: a second call reads the same blocks back
    again = cpt.cached_blocks(docs, order, 32, tmp_path, "t")
    assert np.array_equal(np.asarray(cpt.cached_blocks(docs, order, 32, tmp_path, "t")), again)
    assert any(p.name.startswith("packed-") for p in tmp_path.iterdir())


def test_separate_packing_blocks_attention_across_documents(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    eos = tiny_tokenizer.eos_token_id
    a = tiny_tokenizer("The court shall hear the case.", add_special_tokens=False)["input_ids"] + [eos]
    b = tiny_tokenizer("国家出资企业 国有资产", add_special_tokens=False)["input_ids"] + [eos]
    block = np.asarray(a + b, dtype=np.uint32)
    sep = cpt.BlockCollator(eos, separate=True)([block])
    assert sep["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    # separate: no loss on b's first token (it has no context); cross trains on it, as run_clm does
    assert sep["labels"][0].tolist() == a + [-100] + b[1:]
    cross = cpt.BlockCollator(eos, separate=False)([block])
    assert "position_ids" not in cross and torch.equal(cross["labels"], cross["input_ids"])
    # evaluation blocks score text only (no document's first token, no EOS), whatever the training mode
    evaluated = cpt.BlockCollator(eos, separate=False)([cpt.PackedBlocks(block[None], mask_boundaries=True)[0]])
    assert evaluated["labels"][0].tolist() == a[:-1] + [-100, -100] + b[1:-1] + [-100]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits
        packed = model(input_ids=sep["input_ids"], position_ids=sep["position_ids"]).logits[:, len(a):]
        crossed = model(input_ids=cross["input_ids"]).logits[:, len(a):]
    assert torch.allclose(packed, alone, atol=1e-5)  # b cannot see a
    assert (crossed - alone).abs().max() > 1e-3  # with cross attention it can


def test_resample_by_tokens_hits_the_ratio(corpus, tiny_tokenizer, tmp_path):
    docs = cpt.tokenize_file(corpus / "train.jsonl", tiny_tokenizer, tmp_path, ["general"])
    for ratio in (0.0, 0.25, 0.75, 1.0):
        order, achieved = cpt.resample_by_tokens(docs, ratio, 20_000, seed=1)
        tokens = int(docs.lengths[order].sum())
        general = int(docs.lengths[order][docs.kinds[order] == 1].sum())
        assert 20_000 <= tokens < 20_000 + 2 * docs.lengths.max()
        assert abs(general / tokens - ratio) < 0.02
        assert achieved["general_share"] == pytest.approx(general / tokens)
    # seeded: same seed, same order
    assert np.array_equal(cpt.resample_by_tokens(docs, 0.5, 5000, 3)[0], cpt.resample_by_tokens(docs, 0.5, 5000, 3)[0])


def test_kind_from_source_when_field_missing(tmp_path, tiny_tokenizer):
    _write(tmp_path / "t.jsonl", [{"text": "law text", "_source": "raw/laws.jsonl"},
                                  {"text": "news", "source": "general:wiki"}, {"text": "x", "kind": "general"}])
    docs = cpt.tokenize_file(tmp_path / "t.jsonl", tiny_tokenizer, tmp_path / "c", ["general"])
    assert docs.kinds.tolist() == [0, 1, 1]
    assert docs.stats["kind_from_source"] == 2


def test_4bit_layers_stay_trainable_after_an_eval_forward(tiny_model_dir, tiny_tokenizer):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward, after which gradients
    skip the frozen layers; the stage switches that off, so gradients equal a fresh model's."""
    from common.modeling import add_lora, load_model

    ids = tiny_tokenizer(["The court shall hear the case within thirty days."], return_tensors="pt").input_ids

    def grads(eval_first: bool):
        torch.manual_seed(0)
        model = add_lora(load_model(tiny_model_dir, quantization="4bit", dtype="bf16", device="cpu"), r=4, alpha=8, dropout=0.0)
        cpt.keep_4bit_trainable(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = grads(False), grads(True)
    first = next(n for n in fresh if "layers.0.self_attn.q_proj.lora_A" in n)
    assert torch.equal(fresh[first], after_eval[first])


# ---------------------------------------------------------------------------------------------
# a full QLoRA run


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpt") / "02_cpt"
    # --train_embeddings: a random tiny model learns mostly through its embeddings and head
    manifest = cpt.main(config(tiny_model_dir, corpus, out, max_steps=16, learning_rate=2e-2, train_embeddings=True,
                               domain_eval_prefixes=["law"]))
    return out, manifest


def test_qlora_run_writes_exactly_its_files(qlora_run):
    out, manifest = qlora_run
    assert files_under(out) == {
        "config.yaml", "manifest.json", "eval.json", "metrics.jsonl", "report.md",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
        "model/config.json", "model/generation_config.json", "model/model.safetensors",
        "model/tokenizer.json", "model/tokenizer_config.json", "model/chat_template.jinja",
    }
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["stage"] == "02_cpt" and on_disk["status"] == "complete"
    assert on_disk["inputs"]["corpus"]["stage"] == "01_corpus" and on_disk["inputs"]["corpus"]["manifest_sha256"]
    assert on_disk["config"]["quantization"] == "auto" and on_disk["outputs"]["model"] == "model"
    m = on_disk["metrics"]
    for key in ("ppl_domain_before", "ppl_domain_after", "ppl_general_before", "ppl_general_after",
                "general_retention", "domain_gain", "tokens_per_s", "first_loss", "last_loss"):
        assert math.isfinite(m[key]), key
    assert m["steps"] == 16 and m["tokens"] == 16 * 2 * 32
    assert m["general_retention_task"] == "general_ppl_news"  # the independent set, not the replay hold-out


def test_qlora_loss_falls_and_logs_one_line_per_step(qlora_run):
    out, manifest = qlora_run
    recs = records(out / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 16
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in recs if "ppl_domain" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12, 16]
    assert evals[-1]["ppl_domain"] < evals[0]["ppl_domain"]
    assert all(r["tok/s"] > 0 for r in recs if "loss" in r)


def test_retention_maths_in_eval_json(qlora_run):
    out, _ = qlora_run
    ev = json.loads((out / "eval.json").read_text())
    b, a = ev["before"], ev["after"]
    assert ev["retention"]["general_ppl_news"] == pytest.approx(b["general_ppl_news"]["ppl"] / a["general_ppl_news"]["ppl"])
    assert ev["retention"]["general_ppl"] == pytest.approx(b["general_ppl"]["ppl"] / a["general_ppl"]["ppl"])
    assert ev["retention"]["piqa"] == pytest.approx(a["piqa"]["acc"] / b["piqa"]["acc"])
    assert ev["domain_gain"]["domain_ppl"] == pytest.approx(b["domain_ppl"]["ppl"] / a["domain_ppl"]["ppl"])
    assert ev["summary"]["general_retention"] == ev["retention"]["general_ppl_news"]
    assert ev["tasks"]["general_ppl"]["role"] == "general_replay" and ev["tasks"]["piqa"]["type"] == "mcq"
    # --domain_eval_prefixes law: law_mcq is a domain set (gain), piqa a general one (retention)
    assert ev["tasks"]["law_mcq"]["role"] == "domain" and "law_mcq" in ev["domain_gain"] and "law_mcq" not in ev["retention"]
    expected = a["law_mcq"]["acc"] / b["law_mcq"]["acc"] if b["law_mcq"]["acc"] else None  # NaN is written as null
    assert ev["domain_gain"]["law_mcq"] == (pytest.approx(expected) if expected is not None else None)
    assert ev["guard"]["set"] == "general_independent" and ev["guard"]["triggered"] is False
    assert ev["domain_gain"]["domain_ppl"] > 1.0  # training on the domain lowered its perplexity


def test_merged_model_equals_adapter_model(qlora_run, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = qlora_run
    ids = tiny_tokenizer(["国家出资企业 国有资产 监督管理", "The court shall hear"], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**ids).logits
        adapter_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(**ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)(**ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
    assert (adapter_logits - base_logits).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# resume, guard, sweep


class _Crash(Exception):
    pass


def test_resume_continues_with_the_same_data_and_losses(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    seen: list[list[int]] = []
    original = cpt.BlockCollator.__call__

    def spy(self, rows):
        batch = original(self, rows)
        seen.append(batch["input_ids"].sum(dim=1).tolist())
        return batch

    monkeypatch.setattr(cpt.BlockCollator, "__call__", spy)
    kw = dict(quantization="none", max_steps=6, save_every=2, eval_every=0, lora_dropout=0.1, eval_before_after=False)

    full = tmp_path / "full"
    cpt.main(config(tiny_model_dir, corpus, full, **kw))
    full_batches = list(seen)
    full_losses = {r["step"]: r["loss"] for r in records(full / "metrics.jsonl")}

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **k):
            if state.global_step == 4:
                raise _Crash()

    cut = tmp_path / "cut"
    seen.clear()
    with pytest.raises(_Crash):
        cpt.main(config(tiny_model_dir, corpus, cut, **kw), extra_callbacks=[CrashAfterSave()])
    assert not (cut / "manifest.json").exists() and (cut / "checkpoints" / "checkpoint-4").is_dir()
    assert seen[:4] == full_batches[:4]  # (the loader had prefetched batch 5 when it stopped)
    seen.clear()
    manifest = cpt.main(config(tiny_model_dir, corpus, cut, resume=True, **kw))
    assert seen[-2:] == full_batches[4:6]  # steps 5 and 6 see the same blocks
    cut_losses = {r["step"]: r["loss"] for r in records(cut / "metrics.jsonl")}
    assert sorted(cut_losses) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert cut_losses[step] == pytest.approx(full_losses[step], abs=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(full / "adapter" / "adapter_model.safetensors"), load_file(cut / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert manifest["metrics"]["steps"] == 6


@pytest.fixture(scope="module")
def domain_only_corpus(tmp_path_factory) -> Path:
    """Chinese domain text only, English general text only in evaluation: training makes general worse."""
    rng = random.Random(0)
    zh, en = DOMAIN[1:3], GENERAL[:2]
    root = tmp_path_factory.mktemp("01_domain_only")
    run = StageRun("01_corpus", root, None, overwrite=True)
    _write(root / "train.jsonl", [{"text": " ".join(rng.choice(zh) for _ in range(3)), "kind": "domain"} for _ in range(80)])
    _write(root / "validation_domain.jsonl", [{"text": " ".join(rng.choice(zh) for _ in range(3))} for _ in range(6)])
    _write(root / "validation_general.jsonl", [{"text": " ".join(rng.choice(en) for _ in range(3))} for _ in range(6)])
    _write(root / "eval" / "general_ppl_en.jsonl", [{"text": " ".join(rng.choice(en) for _ in range(3))} for _ in range(6)])
    run.finish(outputs={}, metrics={})
    return root


GUARD = dict(quantization="none", train_embeddings=True, learning_rate=2e-2, max_steps=16, eval_every=2, save_every=0)


def test_guard_stops_when_general_perplexity_rises(tiny_model_dir, domain_only_corpus, tmp_path):
    manifest = cpt.main(config(tiny_model_dir, domain_only_corpus, tmp_path / "o", guard_action="stop", **GUARD))
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    event = ev["guard"]["event"]
    assert ev["guard"]["triggered"] and event["set"] == "general_independent" and event["rise"] > 0.05
    assert manifest["metrics"]["guard_triggered"] is True and manifest["metrics"]["steps"] == event["step"] < 16
    rises = [e["general_rise"] for e in ev["periodic_eval"]]
    assert max(rises[:-1]) <= 0.05 < rises[-1]  # stopped at the first evaluation over the limit
    assert ev["periodic_eval"][-1]["ppl_domain"] < ev["periodic_eval"][0]["ppl_domain"] / 2


def test_guard_rollback_restores_the_best_checkpoint(tiny_model_dir, domain_only_corpus, tmp_path):
    out = tmp_path / "o"
    manifest = cpt.main(config(tiny_model_dir, domain_only_corpus, out, guard_action="rollback", keep_checkpoints=True, **GUARD))
    ev = json.loads((out / "eval.json").read_text())
    step = ev["guard"]["rolled_back_to_step"]
    within = [e for e in ev["periodic_eval"] if e["general_rise"] <= 0.05]
    assert step == min(within, key=lambda e: e["ppl_domain"])["step"] > 0  # the stated rule
    ckpt = out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"
    assert ckpt.read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert manifest["metrics"]["general_retention"] >= 0.95  # the shipped model is within the limit


def test_guard_rollback_to_the_base_model(tiny_model_dir, corpus, tmp_path):
    # Full fine-tuning with a huge learning rate is worse at the first evaluation: back to the base weights.
    manifest = cpt.main(config(tiny_model_dir, corpus, tmp_path / "o", quantization="none", full_finetune=True,
                               learning_rate=0.5, warmup_ratio=0.0, max_steps=20, eval_every=2, save_every=0,
                               guard_action="rollback"))
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert ev["guard"]["event"]["step"] == 2 and ev["guard"]["rolled_back_to_step"] == 0
    for name in ("domain_ppl", "general_ppl_news"):
        assert ev["after"][name]["ppl"] == pytest.approx(ev["before"][name]["ppl"], rel=1e-3)
    assert "model/model.safetensors" in files_under(tmp_path / "o") and not (tmp_path / "o" / "adapter").exists()
    assert manifest["metrics"]["steps"] == 2


def test_sweep_writes_table_plot_and_picks_by_rule(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "o"
    manifest = cpt.main(config(tiny_model_dir, corpus, out, quantization="none", replay_ratios=[0.0, 0.5],
                               max_steps=4, eval_every=2, save_every=0))
    assert {"sweep/sweep.md", "sweep/sweep.png", "sweep/ratio_0/eval.json", "sweep/ratio_0.5/eval.json",
            "sweep/ratio_0/adapter/adapter_model.safetensors", "adapter/adapter_model.safetensors",
            "model/model.safetensors", "eval.json", "manifest.json"} <= files_under(out)
    table = (out / "sweep" / "sweep.md").read_text()
    assert "| 0.00 |" in table and "| 0.50 |" in table and "**yes**" in table
    ev = json.loads((out / "eval.json").read_text())
    rows = ev["sweep"]["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and all(r["steps"] == 4 for r in rows)
    assert abs(rows[1]["general_share"] - 0.5) < 0.05 and rows[0]["general_share"] == 0.0
    best, _ = cpt.pick_ratio(rows, 0.05)
    assert ev["sweep"]["picked_ratio"] == best["ratio"] == manifest["metrics"]["replay_ratio"]
    picked = out / "sweep" / f"ratio_{best['ratio']:g}" / "adapter" / "adapter_model.safetensors"
    assert picked.read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    recs = records(out / "metrics.jsonl")
    assert {r["replay_ratio"] for r in recs} == {0.0, 0.5}


def test_pick_ratio_rule():
    rows = [{"ratio": 0.0, "domain_ppl_after": 3.0, "general_retention": 0.90},
            {"ratio": 0.25, "domain_ppl_after": 3.5, "general_retention": 0.96},
            {"ratio": 0.5, "domain_ppl_after": 4.0, "general_retention": 1.01}]
    assert cpt.pick_ratio(rows, 0.05)[0]["ratio"] == 0.25  # best domain ppl among retention >= 0.95
    assert cpt.pick_ratio(rows, 0.0)[0]["ratio"] == 0.5
    assert cpt.pick_ratio(rows[:1], 0.05)[0]["ratio"] == 0.0  # none qualifies: highest retention


# ---------------------------------------------------------------------------------------------
# dry run


QWEN2_72B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
}


def test_dry_run_plans_a_72b_qlora_from_config_json_alone(tmp_path, corpus, capsys):
    model_dir = tmp_path / "qwen72b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN2_72B))
    plan = cpt.main(make_config(cpt.Config, {"model_name_or_path": str(model_dir), "corpus_dir": str(corpus),
                                             "output_dir": str(tmp_path / "out"), "block_size": 4096, "batch_size": 1,
                                             "gradient_accumulation_steps": 16, "gradient_checkpointing": True,
                                             "max_steps": 1000, "dry_run": True}))
    assert not (tmp_path / "out").exists()  # nothing written
    p = plan["parameters"]
    assert p["total"] == pytest.approx(72.7e9, rel=0.01) and p["layers"] == 80
    # LoRA r16 on all 7 linear projections of 80 layers
    per_layer = 16 * ((8192 + 8192) * 2 + (8192 + 1024) * 2 + (8192 + 29568) * 2 + (29568 + 8192))
    assert p["lora"] == 80 * per_layer and p["lora_modules"] == 560
    mem = plan["memory"]
    assert 35 < mem["weights_by_bits_gb"]["4bit (NF4, double quant)"] < 45
    assert mem["weights_by_bits_gb"]["16bit (bf16)"] == pytest.approx(72.7e9 * 2 / 1024**3, rel=0.01)
    assert mem["activations_ckpt_gb"] < mem["activations_no_ckpt_gb"]
    assert 40 < mem["total_gb"] < 80  # fits two 80 GB GPUs with QLoRA
    assert plan["tokens_per_step"] == 16 * 4096 and plan["steps"] == 1000
    assert plan["data"]["tokens"] > 0 and plan["tokenizer"] is None  # no tokenizer: bytes / 4
    text = capsys.readouterr().out
    assert "72.7" in text and "4bit" in text and "gradient checkpointing" in text


# ---------------------------------------------------------------------------------------------
# bad input: one clear line each


def test_tokenizer_without_eos(tmp_path, corpus, tiny_model_dir):
    import shutil

    model_dir = tmp_path / "noeos"
    shutil.copytree(tiny_model_dir, model_dir)
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(UserError, match="tokenizer has no EOS token"):
        cpt.main(config(model_dir, corpus, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_block_size_above_context(tmp_path, corpus, tiny_model_dir):
    with pytest.raises(UserError, match=r"--block_size 1024 is above the model's context \(512"):
        cpt.main(config(tiny_model_dir, corpus, tmp_path / "o", block_size=1024))


def test_empty_splits(tmp_path, tiny_model_dir):
    c1 = make_corpus(tmp_path / "c1", train=[{"text": " ", "kind": "domain"}])
    with pytest.raises(UserError, match=r"train.jsonl: empty split"):
        cpt.main(config(tiny_model_dir, c1, tmp_path / "o1"))
    c2 = make_corpus(tmp_path / "c2", val_domain=[])
    with pytest.raises(UserError, match=r"validation_domain.jsonl: empty split"):
        cpt.main(config(tiny_model_dir, c2, tmp_path / "o2"))
    c3 = make_corpus(tmp_path / "c3", train=[{"text": "only law text here", "kind": "domain"}] * 20)
    with pytest.raises(UserError, match=r"no general records, but replay ratio 0.5"):
        cpt.main(config(tiny_model_dir, c3, tmp_path / "o3", replay_ratios=[0.5]))
    # nothing half-made is left behind: a corrected rerun needs no --overwrite
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_unfinished_upstream_is_refused(tmp_path, tiny_model_dir, corpus):
    import shutil

    broken = tmp_path / "c"
    shutil.copytree(corpus, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        cpt.main(config(tiny_model_dir, broken, tmp_path / "o"))


def test_corrupted_checkpoint_is_named(tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "o"
    cpt.main(config(tiny_model_dir, corpus, out, quantization="none", max_steps=2, save_every=1, eval_every=0,
                    eval_before_after=False, keep_checkpoints=True))
    weights = out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"checkpoint-2: corrupt checkpoint \(adapter_model.safetensors"):
        cpt.main(config(tiny_model_dir, corpus, out, quantization="none", max_steps=2, save_every=1, eval_every=0,
                        eval_before_after=False, resume=True))


def test_lora_target_matching_nothing(tmp_path, tiny_model_dir, corpus):
    with pytest.raises(UserError, match="match no module"):
        cpt.main(config(tiny_model_dir, corpus, tmp_path / "o", lora_target_modules=["no_such_proj"], eval_before_after=False))


def test_bad_flags(tmp_path, tiny_model_dir, corpus):
    with pytest.raises(UserError, match="--full_finetune trains unquantized"):
        cpt.main(config(tiny_model_dir, corpus, tmp_path / "o", full_finetune=True, quantization="4bit"))
    with pytest.raises(UserError, match=r"--replay_ratios must lie in \[0, 1\]"):
        cpt.main(config(tiny_model_dir, corpus, tmp_path / "o", replay_ratios=[1.5]))


# ---------------------------------------------------------------------------------------------
# two processes (DDP, gloo on CPU) under torchrun


def test_two_processes_with_torchrun(tmp_path, tiny_model_dir, corpus):
    """QLoRA (4-bit, the default) with DDP over gloo: bitsandbytes runs on CPU in both processes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DF_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(ROOT / "02_continual_pretrain.py"), "--model_name_or_path", str(tiny_model_dir), "--corpus_dir", str(corpus),
           "--output_dir", str(out), "--block_size", "32", "--batch_size", "2", "--max_steps", "4",
           "--eval_every", "2", "--save_every", "2", "--log_every", "1", "--learning_rate", "1e-2", "--eval_limit", "10",
           "--eval_docs", "8", "--lora_r", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert manifest["metrics"]["tokens"] == 4 * 2 * 2 * 32  # steps x batch x processes x block
    recs = records(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]  # rank 0 logs alone
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
