"""ROUGE-1/2/L and BLEU-4 for Chinese and English as a local `evaluate` module.

`evaluate.load("rouge")` needs the Hugging Face hub, and its tokenizer scores Chinese as 0. This
module loads from disk and delegates to `common.metrics`, so it gives exactly the numbers the
stages report:

    import evaluate
    metric = evaluate.load("common/metrics_module/domain_text_metrics")
    metric.compute(predictions=["..."], references=["..."], lang="auto")
    # -> {"rouge1": 0..1, "rouge2": 0..1, "rougeL": 0..1, "bleu4": 0..100}

`evaluate` copies this file into its modules cache before importing it, so the `common` package
must be importable: run from the repository root (or a copy of a stage plus `common/`), or put
that folder on PYTHONPATH.
"""

import datasets
import evaluate

from common.metrics import text_metrics

_DESCRIPTION = (
    "Mean ROUGE-1/2/L F1 (0..1; Chinese segmented with jieba, English lowercased words and "
    "punctuation) and sacrebleu corpus BLEU-4 (0..100; tokenize 'zh' or '13a')."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    lang: "auto" (decided from the references), "zh" or "en".
Returns:
    dict with rouge1, rouge2, rougeL (F1, 0..1) and bleu4 (0..100).
"""


class DomainTextMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, lang="auto"):
        return text_metrics(predictions, references, lang)
