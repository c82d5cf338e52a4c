"""ROUGE/BLEU against values worked out by hand, the local evaluate module, and perplexity
against a direct forward pass. Offline, CPU, a tiny random Llama built here."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from common import metrics
from common.metrics import _windows, bleu4, detect_lang, perplexity, rouge, text_metrics, tokenize_for_metrics

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "common" / "metrics_module" / "domain_text_metrics"

# English: two pairs. Tokens are lowercased words and punctuation marks.
EN_PREDS = ["The cat sat on the mat.", "Hello world"]
EN_REFS = ["A cat is on the red mat.", "hello world!"]
# Pair 1: pred [the cat sat on the mat .] (7), ref [a cat is on the red mat .] (8).
#   ROUGE-1: clipped overlap cat, on, the (pred has two, ref one), mat, . = 5 -> F = 2*5/(7+8) = 2/3
#   ROUGE-2: pred bigrams the-cat cat-sat sat-on on-the the-mat mat-. (6); ref a-cat cat-is is-on
#            on-the the-red red-mat mat-. (7); shared on-the, mat-. = 2 -> F = 2*2/(6+7) = 4/13
#   ROUGE-L: LCS cat on the mat . = 5 -> F = 2*5/15 = 2/3
# Pair 2: pred [hello world] (2), ref [hello world !] (3).
#   ROUGE-1: 2 shared -> 4/5; ROUGE-2: hello-world shared of 1 and 2 bigrams -> 2/3; ROUGE-L: 2 -> 4/5
# Means over the two pairs:
EN_EXPECTED = {
    "rouge1": (2 / 3 + 4 / 5) / 2,  # 11/15
    "rouge2": (4 / 13 + 2 / 3) / 2,  # 19/39
    "rougeL": (2 / 3 + 4 / 5) / 2,
}

# Chinese: jieba gives [我们 今天 去 北京 开会] and [我们 明天 去 北京 开会].
ZH_PRED, ZH_REF = "我们今天去北京开会", "我们明天去北京开会"
#   ROUGE-1: 我们 去 北京 开会 = 4 of 5 and 5 -> 8/10 = 4/5
#   ROUGE-2: bigrams 我们-今天 今天-去 去-北京 北京-开会 vs 我们-明天 明天-去 去-北京 北京-开会:
#            2 shared of 4 and 4 -> 4/8 = 1/2
#   ROUGE-L: LCS 我们 去 北京 开会 = 4 -> 4/5
ZH_EXPECTED = {"rouge1": 4 / 5, "rouge2": 1 / 2, "rougeL": 4 / 5}
# Chinese BLEU-4 on jieba words: pred [国家 出资 企业 应当 依法 经营] (6) vs
# ref [国家 出资 企业 应当 依法 诚信 经营] (7):
#   p1 6/6; p2 国家-出资 出资-企业 企业-应当 应当-依法 = 4/5 (依法-经营 is not in the ref);
#   p3 3/4; p4 2/3; brevity penalty exp(1 - 7/6)  ->  100 * exp(-1/6) * (2/5) ** (1/4)
ZH_BLEU_PRED, ZH_BLEU_REF = "国家出资企业应当依法经营", "国家出资企业应当依法诚信经营"
ZH_BLEU = 100 * math.exp(-1 / 6) * (2 / 5) ** 0.25
# The same pair's ROUGE: 1-grams 6 shared of 6 and 7 -> 12/13; 2-grams 4 shared of 5 and 6 -> 8/11;
# LCS is the whole prediction (6) -> 12/13.
ZH_BLEU_ALL = {"rouge1": 12 / 13, "rouge2": 8 / 11, "rougeL": 12 / 13, "bleu4": ZH_BLEU}
# English BLEU-4, "13a": pred "the cat sat on the mat today" (7) vs ref "the cat sat on the mat" (6):
#   p1 6/7, p2 5/6, p3 4/5, p4 3/4, BP = 1 (the prediction is longer) -> 100 * (3/7) ** (1/4)
EN_BLEU_PRED, EN_BLEU_REF = "the cat sat on the mat today", "the cat sat on the mat"
EN_BLEU = 100 * (3 / 7) ** 0.25


def test_detect_lang():
    assert detect_lang(ZH_REF) == "zh"
    assert detect_lang("The Company Law of the PRC (公司法) was revised.") == "en"
    assert detect_lang("第一条 为了规范公司的组织和行为，制定 Company Law。") == "zh"
    assert detect_lang("") == "en"


def test_tokenization():
    import jieba

    assert tokenize_for_metrics(ZH_PRED, "zh") == ["我们", "今天", "去", "北京", "开会"]
    text = "第一条 为了规范公司的组织和行为，保护 Company Law 2018年。"
    # rjieba (when installed) must agree with jieba, the reference; spaces dropped, text lowercased.
    assert tokenize_for_metrics(text, "zh") == [w for w in jieba.lcut(text.lower()) if w.strip()]
    assert tokenize_for_metrics("Hello, World!  It's 2024.", "en") == ["hello", ",", "world", "!", "it", "'", "s", "2024", "."]
    with pytest.raises(ValueError):
        tokenize_for_metrics("x", "fr")


def test_rouge_by_hand():
    got = rouge(EN_PREDS, EN_REFS, "en")
    assert got == pytest.approx(EN_EXPECTED, abs=1e-12)
    assert rouge(EN_PREDS, EN_REFS) == pytest.approx(EN_EXPECTED, abs=1e-12)  # auto -> en
    got = rouge([ZH_PRED], [ZH_REF])  # auto -> zh
    assert got == pytest.approx(ZH_EXPECTED, abs=1e-12)
    assert rouge(["完全相同的句子"], ["完全相同的句子"], "zh") == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge(["毫无关系"], ["公司法"], "zh")["rouge1"] == 0.0


def test_bleu_by_hand():
    assert bleu4([ZH_BLEU_PRED], [ZH_BLEU_REF]) == pytest.approx(ZH_BLEU, abs=1e-9)
    assert bleu4([EN_BLEU_PRED], [EN_BLEU_REF], "en") == pytest.approx(EN_BLEU, abs=1e-9)
    all_four = text_metrics([ZH_BLEU_PRED], [ZH_BLEU_REF], "zh")
    assert all_four == pytest.approx(ZH_BLEU_ALL, abs=1e-9)


def test_bad_metric_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        bleu4([], [])


@pytest.mark.parametrize("where", ["dir", "file"])
def test_evaluate_module_matches(where):
    import evaluate

    path = MODULE_DIR if where == "dir" else MODULE_DIR / "domain_text_metrics.py"
    metric = evaluate.load(str(path))
    got = metric.compute(predictions=EN_PREDS, references=EN_REFS, lang="en")
    assert got == pytest.approx({**EN_EXPECTED, "bleu4": bleu4(EN_PREDS, EN_REFS, "en")}, abs=1e-12)
    got = metric.compute(predictions=[ZH_BLEU_PRED], references=[ZH_BLEU_REF])
    assert got == pytest.approx(ZH_BLEU_ALL, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Perplexity

CORPUS = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat sat .",
    "hello world !",
    "the law of the company is on the mat",
]


def make_tokenizer(bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = make_tokenizer()
    return make_model(len(tok)), tok


def manual_nll(model, windows):
    """Sum of next-token losses and count, one unpadded forward per (ids, first predicted index)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, first in windows:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            losses = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
            total += float(losses[first - 1 :].sum())
            count += len(ids) - first
    return total, count


def test_windows():
    # non-overlapping: 10 tokens in windows of 4 -> [0,4) [4,8) [8,10); first token of each not predicted
    assert list(_windows(10, 4, 4)) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # sliding: each token predicted once, with up to 3 tokens of context
    assert list(_windows(10, 4, 2)) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert list(_windows(1, 4, 4)) == []
    assert list(_windows(4, 4, 4)) == [(0, 4, 1)]


def test_perplexity_equals_manual_forward(tiny):
    model, tok = tiny
    assert metrics.tokenizer_adds_bos(tok)
    docs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS]
    total, count = manual_nll(model, [(ids, 1) for ids in docs])
    assert count == sum(len(d) - 1 for d in docs)  # every text token is predicted, the BOS never
    got = perplexity(model, tok, CORPUS, max_length=64, batch_size=3, progress=False)
    assert got["tokens"] == count and got["docs"] == len(CORPUS)
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # batching and padding do not change the result; a second run gives the same numbers
    one = perplexity(model, tok, CORPUS, max_length=64, batch_size=1, progress=False)
    assert one["nll"] == pytest.approx(got["nll"], rel=1e-5)
    assert perplexity(model, tok, CORPUS, max_length=64, batch_size=3, progress=False) == got


def test_perplexity_windows_manual(tiny):
    model, tok = tiny
    text = "a dog ran in the park and the cat sat"  # 10 words + BOS = 11 tokens
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 11
    # windows of 4: [0,4) [4,8) [8,11) -> 11 - 3 = 8 predicted tokens
    expected = [(ids[0:4], 1), (ids[4:8], 1), (ids[8:11], 1)]
    total, count = manual_nll(model, expected)
    got = perplexity(model, tok, [text], max_length=4, batch_size=2, progress=False)
    assert got["tokens"] == count == 8
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    # sliding windows of 4 every 2: [0,4) predicts 1-3, [2,6) 4-5, [4,8) 6-7, [6,10) 8-9, [8,11) 10
    expected = [(ids[0:4], 1), (ids[2:6], 2), (ids[4:8], 2), (ids[6:10], 2), (ids[8:11], 2)]
    total, count = manual_nll(model, expected)
    got = perplexity(model, tok, [text], max_length=4, batch_size=2, stride=2, progress=False)
    assert got["tokens"] == count == 10
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_without_bos():
    tok = make_tokenizer(bos=False)
    model = make_model(len(tok))
    assert not metrics.tokenizer_adds_bos(tok)
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS]
    total, count = manual_nll(model, [(ids, 1) for ids in docs])
    got = perplexity(model, tok, CORPUS, max_length=64, batch_size=4, progress=False)
    assert got["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_nothing_to_score(tiny):
    from common.errors import UserError

    model, tok = tiny
    with pytest.raises(UserError, match="nothing to score"):
        perplexity(model, tok, [], progress=False)
