"""Shared fixtures: offline, one thread, tiny random Llama models built in seconds."""

from __future__ import annotations

import os
import tempfile

# Before anything imports transformers/datasets: no hub (a hub id would retry for ~47 s), one thread
# (on a loaded 2-core box one thread made tiny-model steps 10-100x faster), no progress bars.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DF_NO_PROGRESS"] = "1"
# evaluate copies local metric modules into a cache: keep tests out of the user's ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="df-hf-modules-"))

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)

TINY_CORPUS = [
    "The court shall hear the case within thirty days.",
    "What is the capital of France? Paris is the capital of France.",
    "Question: which option is right? Answer: A B C D",
    "中华人民共和国企业国有资产法 第一条 为了维护国家基本经济制度，巩固和发展国有经济。",
    "国家出资企业 国有资产 监督管理 公司 法律 银行 证券",
    "人民日报 新华社 北京 一月 报道 经济 发展",
    "The quick brown fox jumps over the lazy dog. Wikipedia is a free encyclopedia.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on a few lines: encodes any text (Chinese included) with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0,
                     max_positions: int = 512) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer Llama (hidden 64) with tokenizer and chat template, saved to disk."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A smaller random Llama sharing the tokenizer: a draft/student for later stages."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_draft"), tiny_tokenizer, hidden=32, layers=1, seed=1)


SMOLLM2_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The provisioned real demo model; `make test` provisions it, so CI never skips this."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"{SMOLLM2_DIR} not provisioned (run `.venv/bin/python data/provision_demo.py --only model`)")
    return SMOLLM2_DIR
