"""The provisioned SmolLM2-135M-Instruct through our loaders (CI provisions it in `make test`)."""

import torch

from common.modeling import add_lora, load_model, load_tokenizer


def _greedy(model, tok, question, max_new_tokens=12):
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_answers_paris(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, dtype="fp32", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "Paris" in _greedy(model, tok, "What is the capital of France?")


def test_smollm2_qlora_step(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    model = add_lora(load_model(smollm2_dir, quantization="4bit", dtype="bf16", device="cpu"), r=8, alpha=16,
                     dropout=0.0)
    batch = tok(["中华人民共和国企业国有资产法第一条 为了维护国家基本经济制度，巩固和发展国有经济。"] * 2,
                return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
