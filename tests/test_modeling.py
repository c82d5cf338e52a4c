"""Model loading, QLoRA on CPU, and adapter merge."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.errors import UserError
from common.modeling import add_lora, load_model, load_tokenizer, merge_adapter, trainable_parameters

TEXT = ["The court shall hear the case within thirty days.", "国家出资企业 国有资产 监督管理 公司 法律"]


def _overfit(model, tok, steps, lr, dtype=None):
    batch = tok(TEXT, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_4bit_loss_falls_on_cpu(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, quantization="4bit", dtype="bf16", device="cpu")
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = add_lora(model, r=8, alpha=16, dropout=0.0)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total
    losses = _overfit(model, tok, steps=20, lr=1e-2, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    # Falls by a clear margin (0.5 nats) on an overfit batch, not just noise.
    assert losses[-1] < losses[0] - 0.5, losses


def test_merged_logits_equal_adapter_logits(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    model = add_lora(load_model(tiny_model_dir, dtype="fp32", device="cpu"), r=8, alpha=16, dropout=0.0)
    _overfit(model, tok, steps=5, lr=5e-2)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = tok(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        adapter_logits = model(**ids).logits
    out = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**ids).logits
        base_logits = load_model(tiny_model_dir, dtype="fp32", device="cpu")(**ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
    # The adapter really changed the model, so the equality above is not trivial.
    assert (adapter_logits - base_logits).abs().max() > 1e-2


def test_lora_target_that_matches_nothing(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    with pytest.raises(UserError, match="match no module.*q_proj"):
        add_lora(model, target_modules=["no_such_proj"])


def test_missing_model_path_is_one_line():
    with pytest.raises(UserError, match="does not exist"):
        load_model("models/not-there")
