"""Text metrics (ROUGE, BLEU-4) and perplexity, the same way in every stage.

Overlap metrics follow SOAEsV2's domain QA evaluation: ROUGE-1/2/L F1 and corpus BLEU-4
between a generated answer and its reference.

- ROUGE uses Google's `rouge_score` scorer with our own tokenization. Its default tokenizer keeps
  only ASCII letters and digits, so every Chinese answer would score 0. Chinese is segmented into
  words with jieba (`rjieba`, a jieba-rs binding with identical output, when installed; it is ~12x
  faster); English is lowercased and split into words and punctuation marks. Scores are the mean
  per-pair F1, in 0..1.
- BLEU-4 is sacrebleu's corpus BLEU on its 0..100 scale, with its standard tokenizers: `zh`
  (one token per Chinese character) for Chinese, `13a` for English. BLEU is case-sensitive, as
  sacrebleu reports it by default.
- `lang="auto"` decides once per corpus from the references (see `detect_lang`).

Perplexity (`perplexity`) is token-weighted: exp of the mean negative log-likelihood over every
predicted token of every document. Documents are never packed together, so no token is predicted
from another document's text; see the function for how long documents are windowed.

`common/metrics_module/domain_text_metrics/` wraps `rouge`/`bleu4` as a local `evaluate` module
for code that wants `evaluate.load(...)`; it gives the same numbers.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

# CJK Unified Ideographs, Extension A and the compatibility block: enough to tell Chinese from
# English; Japanese kana and Korean hangul are not handled here.
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_EN_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Chinese text is ~85% ideographs; English text quoting a Chinese name stays far below this.
_ZH_SHARE = 0.25

_cut = None  # the word segmenter, chosen on first use


def detect_lang(text: str) -> str:
    """Return "zh" when at least a quarter of the non-space characters are CJK ideographs, else "en"."""
    chars = sum(1 for c in text if not c.isspace())
    if chars == 0:
        return "en"
    return "zh" if len(_CJK_RE.findall(text)) / chars >= _ZH_SHARE else "en"


def _segmenter():
    global _cut
    if _cut is None:
        try:
            import rjieba

            _cut = rjieba.cut
        except ImportError:
            import logging

            import jieba

            jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..." on stderr
            _cut = jieba.lcut
    return _cut


def tokenize_for_metrics(text: str, lang: str) -> list[str]:
    """Lowercased tokens for overlap metrics: jieba words for "zh", words and punctuation for "en".

    Whitespace tokens (jieba returns the spaces between Latin words) are dropped.
    """
    text = text.lower()
    if lang == "zh":
        return [w for w in _segmenter()(text) if w.strip()]
    if lang == "en":
        return _EN_TOKEN_RE.findall(text)
    raise ValueError(f"lang must be 'zh' or 'en', got {lang!r}")


def _resolve_lang(preds: Sequence[str], refs: Sequence[str], lang: str) -> str:
    if lang == "auto":
        sample = "".join(refs) or "".join(preds)
        return detect_lang(sample)
    if lang not in ("zh", "en"):
        raise ValueError(f"lang must be 'auto', 'zh' or 'en', got {lang!r}")
    return lang


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")


class _MetricTokenizer:
    """The object `rouge_score.rouge_scorer.RougeScorer(tokenizer=...)` expects: a `tokenize` method."""

    def __init__(self, lang: str):
        self.lang = lang

    def tokenize(self, text: str) -> list[str]:
        return tokenize_for_metrics(text, self.lang)


def rouge(preds: Sequence[str], refs: Sequence[str], lang: str = "auto") -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0..1) over prediction/reference pairs."""
    from rouge_score import rouge_scorer

    preds, refs = list(preds), list(refs)
    _check_pairs(preds, refs)
    lang = _resolve_lang(preds, refs, lang)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=_MetricTokenizer(lang))
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(preds, refs):
        scores = scorer.score(ref, pred)  # rouge_score takes (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: totals[k] / len(preds) for k in keys}


def bleu4(preds: Sequence[str], refs: Sequence[str], lang: str = "auto") -> float:
    """Corpus BLEU-4 on sacrebleu's 0..100 scale.

    Chinese is scored on jieba words (as ROUGE is, and as SOAEsV2 reports), not sacrebleu's
    one-token-per-character "zh" tokenizer: the text is segmented here and sacrebleu gets
    `tokenize="none"`. English uses sacrebleu's standard "13a".
    """
    import sacrebleu

    preds, refs = list(preds), list(refs)
    _check_pairs(preds, refs)
    lang = _resolve_lang(preds, refs, lang)
    if lang == "zh":
        seg = lambda t: " ".join(tokenize_for_metrics(t, "zh"))  # noqa: E731
        return float(sacrebleu.corpus_bleu([seg(p) for p in preds], [[seg(r) for r in refs]],
                                           tokenize="none").score)
    return float(sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score)


def text_metrics(preds: Sequence[str], refs: Sequence[str], lang: str = "auto") -> dict:
    """`rouge` and `bleu4` together: {"rouge1", "rouge2", "rougeL", "bleu4"}."""
    preds, refs = list(preds), list(refs)
    _check_pairs(preds, refs)
    lang = _resolve_lang(preds, refs, lang)
    return {**rouge(preds, refs, lang), "bleu4": bleu4(preds, refs, lang)}


# ---------------------------------------------------------------------------------------------
# Perplexity


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer has a BOS token and puts it in front of encoded text by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _windows(n_tokens: int, max_length: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """Yield (begin, end, first_predicted) token positions covering one document.

    Every token from position 1 on is predicted at most once, in the first window that reaches it;
    position 0 (the BOS, or the first text token) has no context and is never predicted.
    """
    predicted_up_to = 1
    begin = 0
    while True:
        end = min(begin + max_length, n_tokens)
        first = max(predicted_up_to, begin + 1)
        if first < end:
            yield begin, end, first
        predicted_up_to = max(predicted_up_to, end)
        if end >= n_tokens:
            return
        begin += stride


def input_device(model):
    """The device the model's input ids go to (its embedding's device, also under a device_map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _progress(iterable, total, desc):
    # Imported here: common.log pulls in torch, which ROUGE/BLEU callers (the evaluate module) do not need.
    from common.log import progress

    return progress(iterable, total=total, desc=desc)


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 1024,
    batch_size: int = 4,
    stride: int | None = None,
    progress: bool = True,
) -> dict:
    """Token-weighted perplexity of `model` on `texts`: {"ppl", "nll", "tokens", "docs"}.

    `nll` is the mean negative log-likelihood (nats) over all predicted tokens and `ppl` = exp(nll).

    - Each document is tokenized and scored on its own, never packed with another. A BOS token is
      put in front when the tokenizer has one and adds it itself; no EOS is added.
    - A document longer than `max_length` tokens is cut into windows. With `stride=None` the
      windows do not overlap, and the first token of each window after the first is not predicted
      (it has no context in its window), so a document of n tokens in w windows contributes
      n - w predicted tokens. With `stride < max_length` windows start every `stride` tokens and
      each predicts only the tokens the previous window did not (HF's sliding-window recipe:
      more context per token, more compute).
    - Windows are batched (longest first), right-padded and the padding is masked out of both
      attention and loss. Runs under `torch.no_grad()` with the model in eval mode (restored after).
    """
    import torch
    import torch.nn.functional as F

    from common.errors import UserError

    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")

    texts = list(texts)
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    windows = []  # (token ids, index of the first predicted token)
    for text in texts:
        ids = bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for begin, end, first in _windows(len(ids), max_length, stride):
            windows.append((ids[begin:end], first - begin))
    if not windows:
        raise UserError(f"perplexity: nothing to score ({len(texts)} texts, none longer than one token)")
    # Longest first: less padding, and the first batch shows at once if memory is too short.
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i][0]), i))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_tokens = 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    it = _progress(batches, total=len(batches), desc="perplexity") if progress else batches
    try:
        with torch.no_grad():
            for batch in it:
                width = len(windows[batch[0]][0])
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = windows[i][0]
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                for row, i in enumerate(batch):
                    ids, first = windows[i]
                    # logits at position t predict token t + 1
                    pred_logits = logits[row, first - 1 : len(ids) - 1].float()
                    targets = input_ids[row, first : len(ids)].to(pred_logits.device)
                    loss = F.cross_entropy(pred_logits, targets, reduction="sum")
                    nll_sum += float(loss.double())
                    n_tokens += len(targets)
    finally:
        if was_training:
            model.train()
    nll = nll_sum / n_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_tokens, "docs": len(texts)}
