"""Stage 01 — build the domain corpus: clean, filter, redact, deduplicate, decontaminate, mix with replay.

Continual pre-training can only learn what the corpus holds. SOAEsV2 (arXiv 2505.04723) filtered its
domain corpus hard before CPT; ixi-GEN/DACP (arXiv 2507.06795) mixed the domain corpus with a
"pseudo-replay" set of general text (about 50%) so that the model keeps its general ability. This
stage does both, for Chinese and English text, and also normalizes the SFT stages and eval sets that
later stages read.

Inputs
    --domain SRC...        domain text (jsonl/json/txt/csv/tsv/parquet, `file.db::table|SELECT ...`,
                           `datasets` save_to_disk folders, globs, folders; see common/data.py).
                           `NAME=SRC` names a source (default: the file's stem); stats are per source.
    --general SRC...       general text for replay, same forms.
    --text_field / --id_field   the record fields holding the text and the id (default text / id).
    --sft_stage NAME=SRC   SFT stages in order (repeat the value: `--sft_stage general=A law=B`). SRC is
                           a file (split into train/test by --sft_test_fraction) or a folder with
                           train.* and test.* files. Records in any form common.data.normalize_sft takes.
    --eval [NAME=]SRC      eval sets; a folder gives one set per file (named by the file's stem).
    --exclude SRC          records whose id must never enter the CPT mixture (e.g. the articles that
                           make_demo_sft.py held out); their text is also used for decontamination.

Outputs (in --output_dir, or <run_dir>/01_corpus)
    train.jsonl                 the CPT mixture, shuffled with --seed: {id, text, source, kind, lang, copy, meta}
    validation_domain.jsonl     domain documents held out whole (by --holdout_field, e.g. whole laws)
    validation_general.jsonl    general documents held out (--general_validation_fraction per source)
    sft/<k>_<name>/{train,test}.jsonl   chat `messages` per SFT stage, k = 1, 2, ... in the given order
    eval/<name>.jsonl           the eval sets, copied record by record (internal fields removed)
    stats.json                  per source and per step: in/out, dropped by reason, characters,
                                PII redactions by type, read errors; docs/s and MB/s per step; mixture
    report.md                   the funnel table, drop reasons, PII, throughput, achieved mixture shares
    lengths.png                 histograms of document length and quality score
    config.yaml, manifest.json  resolved config; manifest written last (status "complete")
The same seed and inputs give byte-identical jsonl files (no timestamps in data, sorted iteration).

Run
    # tiny, CPU, seconds
    python 01_build_corpus.py --domain law=laws.jsonl --general wiki.jsonl --output_dir runs/t/01_corpus
    # the demo (real PRC law + Wikipedia + People's Daily; a few CPU minutes on 2 cores)
    python 01_build_corpus.py --config configs/demo/01_corpus.yaml --run_dir runs/demo
    # more processes on one machine, or datatrove (whose Slurm/Ray executors take the same steps)
    python 01_build_corpus.py --config configs/demo/01_corpus.yaml --run_dir runs/demo --num_proc 8
    python 01_build_corpus.py --config configs/demo/01_corpus.yaml --run_dir runs/demo --engine datatrove

Steps (`--steps` lists the ones to run; all by default; each is counted per source in stats.json)
    per document (plain functions `step(doc, cfg, ctx) -> drop reason | None`, run by the engine):
    1. normalize   HTML entities and tags removed (known tag names only, so `a < b` and `<EMAIL>`
                   survive), Unicode NFKC (full-width letters/digits -> half-width, ligatures,
                   ideographic space) but full-width Chinese punctuation ，：；！？（） kept (NFKC would
                   make it ASCII), control and zero-width characters removed, whitespace collapsed.
    2. language    a script heuristic, no model download: among the letters of the first
                   --lang_sample_chars characters, the share of Han characters decides zh (>= 0.3: a
                   Han character is a word-sized unit, a Latin word has ~5 letters), Latin letters
                   decide en; kana, hangul, Cyrillic... above --lang_max_other_share -> "other".
                   "en" really means Latin script: a French page passes as en and then usually fails
                   the English stop-word rule. Documents outside --languages are dropped.
    3. quality     Gopher rules (Rae et al. 2021) with Chinese-aware bounds. Words are `rjieba.cut`
                   tokens for zh (jieba-identical output, ~12x faster; --segmenter jieba uses jieba
                   itself) and regex word tokens for en; punctuation-only tokens are not words.
                   Rules: word count, mean word length (Gopher's 3..10 for en drops every Chinese
                   document: jieba words average ~1.7-2 characters, so zh uses 1.2..5), hash and
                   ellipsis symbols per word, share of lines starting with a bullet or ending with an
                   ellipsis, share of words with a letter (Han counts as a letter), stop words.
    4. repetition  Gopher/RedPajama-V2 repetition: duplicate lines and paragraphs (share of items
                   and of characters), the most frequent 2/3/4-gram's share of word characters (only
                   n-grams seen twice or more), and the share of word characters covered by
                   duplicated 5..10-grams.
    5. pii         typed placeholders: <EMAIL>, <IP> (IPv4, and IPv6 that `ipaddress` accepts),
                   <ID_NUMBER> (PRC resident ID: 18 digits, a valid birth date and the ISO 7064
                   MOD 11-2 check digit; a wrong check digit is left alone), <BANK_CARD> (13-19
                   digits, plain or in groups of 4, Luhn-valid), <PHONE> (CN mobile 1[3-9]x with
                   optional +86, CN landline 0xx(x)-xxxxxxx(x) or (0xx)..., international
                   +cc ... with 8-15 digits). North-American (xxx) xxx-xxxx numbers are not matched.
    6. decontam    drop a document whose id is in --exclude, or that shares any --decontam_ngram
                   (13) word n-gram with an eval text (the --eval sets, the SFT test splits and the
                   --exclude records). Words as in step 3 (jieba words for Chinese, ~20 characters
                   for 13 words), lowercased, punctuation left out; eval texts shorter than n words
                   are not indexed.
       fingerprint the per-document half of deduplication: exact-duplicate key (xxh3 of the text
                   without whitespace, casefolded) and a datasketch MinHash (num_perm 128, seeded,
                   affine32, xxh32 hashing via `update_batch`) of word n-grams (--minhash_ngram).
    global (in the main process, sorted by input order, so domain beats general and earlier sources
    beat later ones):
    7. exact_dedup first occurrence of each key kept.
    8. near_dedup  datasketch MinHashLSH at --minhash_threshold: a document is dropped when the index
                   of kept documents returns a candidate (LSH banding, no second check).
    then always:
       split       domain documents grouped by --holdout_field (e.g. law_name: whole laws) and whole
                   groups held out until --validation_fraction of the domain documents is reached;
                   general documents held out at random, --general_validation_fraction per source.
       mixture     --replay_ratio is the share of CHARACTERS (not tokens: this stage has no
                   tokenizer) of general text in train. Without --mixture_size the domain train
                   pool is kept whole and the general pool is sampled (seeded shuffle, greedy up to
                   the target) to ratio/(1-ratio) x domain characters; with --mixture_size (total
                   characters) both parts are sampled. A pool smaller than its target is repeated
                   (whole passes, then a sample; `copy` counts the repeats) and the report says so.

Engines: `datasets` runs the per-document steps in one `Dataset.map(batched, num_proc)`; `datatrove`
runs each of them as a datatrove filter step (`LocalPipelineExecutor`, --num_proc tasks; dropped
documents go to an exclusion writer so every drop is counted by reason). Both run the same functions
and give the same kept documents; the global steps run in-process for both, because datatrove's
4-stage MinHash (its own hashing, bucketing and clustering) would not give the same clusters.
"""

from __future__ import annotations

import base64
import html
import ipaddress
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from common.config import run_main
from common.data import ReadStats, normalize_sft, read_records, write_jsonl
from common.errors import UserError
from common.log import get_logger
from common.run import StageRun, atomic_write_json, atomic_write_text, resolve_output_dir

try:  # optional: only --engine datatrove needs it
    from datatrove.pipeline.filters.base_filter import BaseFilter
except ImportError:  # pragma: no cover
    BaseFilter = None

log = get_logger("corpus")

DOC_STEPS = ("normalize", "language", "quality", "repetition", "pii", "decontam")
GLOBAL_STEPS = ("exact_dedup", "near_dedup")
ALL_STEPS = DOC_STEPS + GLOBAL_STEPS
PII_TYPES = ("email", "ip", "id_number", "bank_card", "phone")


@dataclass
class Config:
    # inputs and outputs
    domain: list[str] = field(default_factory=list, metadata={
        "help": "domain sources, NAME=SRC or SRC (jsonl, json, txt, csv, tsv, parquet, file.db::table|query, save_to_disk folder, glob, folder)"})
    general: list[str] = field(default_factory=list, metadata={"help": "general (replay) sources, same forms as --domain"})
    text_field: str = field(default="text", metadata={"help": "record field holding the document text"})
    id_field: str = field(default="id", metadata={"help": "record field holding the document id (else <source>:<line>)"})
    txt_mode: str = field(default="line", metadata={"help": ".txt sources: one document per 'line' or per blank-line separated 'paragraph'"})
    max_docs_per_source: int = field(default=0, metadata={"help": "read at most this many documents per source (0: all); for quick runs"})
    sft_stage: list[str] = field(default_factory=list, metadata={
        "help": "SFT stages in order, NAME=SRC; SRC a file or a folder with train.* and test.*; written to sft/<k>_<name>/"})
    sft_test_fraction: float = field(default=0.1, metadata={"help": "test share when an SFT stage is a single file"})
    eval: list[str] = field(default_factory=list, metadata={"help": "eval sets, [NAME=]SRC; a folder gives one set per file; copied to eval/"})
    exclude: list[str] = field(default_factory=list, metadata={
        "help": "records whose id must not enter the CPT mixture (their text also counts as eval text for decontamination)"})
    output_dir: str = field(default="", metadata={"help": "stage folder (default <run_dir>/01_corpus)"})
    run_dir: str = field(default="", metadata={"help": "run folder; outputs go to <run_dir>/01_corpus"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})
    resume: bool = field(default=False, metadata={"help": "write into a non-empty output folder (this stage recomputes everything)"})
    seed: int = field(default=0, metadata={"help": "seed for MinHash permutations, splits, sampling and shuffling"})
    num_proc: int = field(default=1, metadata={"help": "processes for the per-document steps"})
    engine: str = field(default="datasets", metadata={"help": "datasets (Dataset.map) or datatrove (LocalPipelineExecutor)"})
    datatrove_start_method: str = field(default="fork", metadata={
        "help": "datatrove worker start method: fork shares the loaded stage; forkserver/spawn need an importable module"})
    steps: list[str] = field(default_factory=lambda: list(ALL_STEPS), metadata={
        "help": f"steps to run (fixed order): {' '.join(ALL_STEPS)}"})
    plot: bool = field(default=True, metadata={"help": "write lengths.png"})
    # 1. normalize
    nfkc: bool = field(default=True, metadata={"help": "Unicode NFKC (full-width letters and digits -> half-width, ligatures, ...)"})
    keep_cjk_punctuation: bool = field(default=True, metadata={"help": "keep full-width ，：；！？（） that NFKC would turn into ASCII"})
    strip_html: bool = field(default=True, metadata={"help": "unescape HTML entities and remove HTML tags, comments, script/style blocks"})
    # 2. language
    languages: list[str] = field(default_factory=lambda: ["zh", "en"], metadata={"help": "languages kept (zh, en)"})
    zh_min_han_share: float = field(default=0.3, metadata={"help": "a document is zh when Han characters are at least this share of its letters"})
    lang_max_other_share: float = field(default=0.3, metadata={"help": "letters of other scripts (kana, hangul, Cyrillic, ...) above this share -> 'other'"})
    lang_sample_chars: int = field(default=4000, metadata={"help": "characters looked at for the script heuristic"})
    segmenter: str = field(default="rjieba", metadata={"help": "Chinese word segmenter: rjieba (fast, jieba-identical) or jieba"})
    # 3. quality (Gopher, Chinese-aware)
    min_words_en: int = field(default=50, metadata={"help": "fewest words in an English document (Gopher: 50)"})
    min_words_zh: int = field(default=50, metadata={"help": "fewest jieba words in a Chinese document"})
    max_words_en: int = field(default=100_000, metadata={"help": "most words in an English document (Gopher: 100k)"})
    max_words_zh: int = field(default=100_000, metadata={"help": "most jieba words in a Chinese document"})
    min_mean_word_len_en: float = field(default=3.0, metadata={"help": "English mean word length lower bound (Gopher: 3)"})
    max_mean_word_len_en: float = field(default=10.0, metadata={"help": "English mean word length upper bound (Gopher: 10)"})
    min_mean_word_len_zh: float = field(default=1.2, metadata={"help": "Chinese mean jieba-word length lower bound (real text: ~1.5-2.5)"})
    max_mean_word_len_zh: float = field(default=5.0, metadata={"help": "Chinese mean jieba-word length upper bound"})
    max_symbol_word_ratio: float = field(default=0.1, metadata={"help": "most '#' or ellipses per word (Gopher: 0.1)"})
    max_bullet_lines: float = field(default=0.9, metadata={"help": "largest share of lines starting with a bullet (Gopher: 0.9)"})
    max_ellipsis_lines: float = field(default=0.3, metadata={"help": "largest share of lines ending with an ellipsis (Gopher: 0.3)"})
    min_alpha_words_en: float = field(default=0.8, metadata={"help": "least share of English words containing a letter (Gopher: 0.8)"})
    min_alpha_words_zh: float = field(default=0.7, metadata={"help": "least share of Chinese words containing a letter or Han character (numbers are common)"})
    min_stop_words_en: int = field(default=2, metadata={"help": "least distinct English stop words (Gopher: 2 of the, be, to, of, and, that, have, with)"})
    min_stop_words_zh: int = field(default=1, metadata={"help": "least distinct Chinese function words (的 了 是 在 和 与 或 及 对 为 ...)"})
    # 4. repetition (Gopher)
    max_dup_line_frac: float = field(default=0.3, metadata={"help": "largest share of duplicate lines"})
    max_dup_para_frac: float = field(default=0.3, metadata={"help": "largest share of duplicate paragraphs"})
    max_dup_line_char_frac: float = field(default=0.2, metadata={"help": "largest share of characters in duplicate lines"})
    max_dup_para_char_frac: float = field(default=0.2, metadata={"help": "largest share of characters in duplicate paragraphs"})
    top_ngram_char_frac_en: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16], metadata={
        "help": "largest word-character share of the most frequent 2-, 3-, 4-gram, English (Gopher)"})
    top_ngram_char_frac_zh: list[float] = field(default_factory=lambda: [0.30, 0.30, 0.30], metadata={
        "help": "the same for Chinese jieba words (formal Chinese repeats its terms: ~2% of the demo law articles exceed 0.26 at n=2)"})
    dup_ngram_char_frac_en: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10], metadata={
        "help": "largest word-character share covered by duplicated 5..10-grams, English (Gopher)"})
    dup_ngram_char_frac_zh: list[float] = field(default_factory=lambda: [0.50, 0.47, 0.44, 0.41, 0.38, 0.35], metadata={
        "help": "the same for Chinese jieba words: legal Chinese is formulaic (Gopher's values drop 16% of PRC law "
                "articles; these keep ~96% of them and ~99% of People's Daily)"})
    # 5. pii
    pii_types: list[str] = field(default_factory=lambda: list(PII_TYPES), metadata={"help": f"PII kinds to redact: {' '.join(PII_TYPES)}"})
    # 6. decontamination
    decontam_ngram: int = field(default=13, metadata={"help": "n of the word n-grams shared with eval text that drop a document"})
    # 7-8. deduplication
    minhash_threshold: float = field(default=0.7, metadata={"help": "Jaccard threshold of the MinHash LSH near-duplicate index"})
    minhash_ngram: int = field(default=3, metadata={
        "help": "word n-gram size of MinHash shingles (jieba words for zh). 3, not the usual 5: an edited word then "
                "breaks 3 shingles instead of 5, so copies with a few edits are caught (150 words, 3 edits: recall "
                "1.0 vs ~0.88 at threshold 0.7), and on the demo laws the extra merges are amended versions of an article"})
    minhash_num_perm: int = field(default=128, metadata={"help": "MinHash permutations"})
    # split and mixture
    holdout_field: str = field(default="", metadata={"help": "domain record field whose groups are held out whole (e.g. law_name); empty: single documents"})
    validation_fraction: float = field(default=0.05, metadata={"help": "share of domain documents held out for validation"})
    general_validation_fraction: float = field(default=0.02, metadata={"help": "share of each general source held out for validation"})
    replay_ratio: float = field(default=0.5, metadata={"help": "share of CHARACTERS from general text in train, in [0, 1]"})
    mixture_size: int = field(default=0, metadata={"help": "total characters in train (0: keep the domain train pool whole)"})

    def validate(self) -> None:
        if not 0.0 <= self.replay_ratio <= 1.0:
            raise UserError(f"--replay_ratio must be in [0, 1] (share of general characters), got {self.replay_ratio}")
        for name in ("validation_fraction", "general_validation_fraction", "sft_test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise UserError(f"--minhash_threshold must be in (0, 1], got {self.minhash_threshold}")
        if self.engine not in ("datasets", "datatrove"):
            raise UserError(f"--engine must be datasets or datatrove, got {self.engine!r}")
        if self.engine == "datatrove" and BaseFilter is None:
            raise UserError("--engine datatrove: the datatrove package is not installed")
        if self.segmenter not in ("rjieba", "jieba"):
            raise UserError(f"--segmenter must be rjieba or jieba, got {self.segmenter!r}")
        if self.txt_mode not in ("line", "paragraph"):
            raise UserError(f"--txt_mode must be line or paragraph, got {self.txt_mode!r}")
        for what, values, allowed in (("steps", self.steps, ALL_STEPS), ("languages", self.languages, ("zh", "en")),
                                      ("pii_types", self.pii_types, PII_TYPES)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise UserError(f"--{what}: unknown {bad}; choose from {' '.join(allowed)}")
        if len(self.top_ngram_char_frac_en) > 3 or len(self.top_ngram_char_frac_zh) > 3:
            raise UserError("--top_ngram_char_frac_*: at most 3 values (n = 2, 3, 4)")
        if self.num_proc < 1 or self.minhash_ngram < 1 or self.decontam_ngram < 1 or self.minhash_num_perm < 2:
            raise UserError("--num_proc, --minhash_ngram and --decontam_ngram must be >= 1, --minhash_num_perm >= 2")
        if self.mixture_size < 0:
            raise UserError(f"--mixture_size must be >= 0 characters, got {self.mixture_size}")
        if not self.domain:
            raise UserError("--domain: give at least one domain source")
        if self.replay_ratio > 0 and not self.general:
            raise UserError(f"--replay_ratio {self.replay_ratio} needs --general sources (or --replay_ratio 0)")


# ---------------------------------------------------------------------------------------------------
# 1. normalize

_CJK_PUNCT = "，：；！？（）"
# NFKC would turn these into ASCII; park them on private-use code points across the normalization.
_PROTECT_RE = re.compile(f"[{_CJK_PUNCT}]")
_PROTECT = {c: chr(0xF0000 + i) for i, c in enumerate(_CJK_PUNCT)}
_UNPROTECT_RE = re.compile("[\U000F0000-\U000F0006]")
_UNPROTECT = {v: k for k, v in _PROTECT.items()}
# C0/C1 controls except tab and newline, soft hyphen, zero-width characters, BOM
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
_NEWLINES_RE = re.compile("\r\n?|[\u2028\u2029]")
_HTML_NAMES = ("a|abbr|address|article|aside|b|big|blockquote|body|br|caption|center|cite|code|col|dd|del|div|dl|dt|"
               "em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|li|"
               "link|main|meta|nav|noscript|ol|option|p|pre|q|s|section|select|small|span|strike|strong|sub|sup|"
               "table|tbody|td|textarea|tfoot|th|thead|title|tr|tt|u|ul")
_HTML_SKIP = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_HTML_BREAK = re.compile(r"<\s*/?\s*(?:br|p|div|li|tr|h[1-6]|table|ul|ol|blockquote|pre|hr|section|article)\b[^<>]*>", re.I)
_HTML_TAG = re.compile(rf"<\s*/?\s*(?:{_HTML_NAMES})\b[^<>]*>", re.I)
_SPACES = re.compile(r"[^\S\n]+")
_EOL_SPACES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: Config) -> str:
    if cfg.strip_html:
        if "&" in text:
            text = html.unescape(text)
        if "<" in text:
            text = _HTML_TAG.sub("", _HTML_BREAK.sub("\n", _HTML_SKIP.sub("", text)))
    if cfg.nfkc:
        if cfg.keep_cjk_punctuation:
            text = _PROTECT_RE.sub(lambda m: _PROTECT[m.group()], text)
            text = unicodedata.normalize("NFKC", text)
            text = _UNPROTECT_RE.sub(lambda m: _UNPROTECT[m.group()], text)
        else:
            text = unicodedata.normalize("NFKC", text)
    text = _CONTROL_RE.sub("", _NEWLINES_RE.sub("\n", text))
    text = _SPACES.sub(" ", text)
    text = _EOL_SPACES.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def step_normalize(doc: dict, cfg: Config, ctx: dict) -> str | None:
    doc["text"] = normalize_text(doc["text"], cfg)
    doc["n_norm"] = len(doc["text"])
    return None if doc["text"] else "empty"


# ---------------------------------------------------------------------------------------------------
# 2. language (script heuristic)

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]+")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_LETTER = re.compile(r"[^\W\d_]+")


def _count(pattern: re.Pattern, text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def detect_lang(text: str, cfg: Config) -> str:
    sample = text[: cfg.lang_sample_chars]
    letters = _count(_LETTER, sample)
    if not letters:
        return "other"
    han = _count(_HAN, sample)
    latin = _count(_LATIN, sample)
    if (letters - han - latin) / letters > cfg.lang_max_other_share:
        return "other"
    if han / letters >= cfg.zh_min_han_share:
        return "zh"
    return "en" if latin else "other"


def step_language(doc: dict, cfg: Config, ctx: dict) -> str | None:
    doc["lang"] = detect_lang(doc["text"], cfg)
    if "language" in cfg.steps and doc["lang"] not in cfg.languages:
        return f"lang_{doc['lang']}"
    return None


# ---------------------------------------------------------------------------------------------------
# Words: jieba for Chinese, regex tokens for English; punctuation-only tokens are not words.

_EN_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_ALNUM = re.compile(r"[^\W_]")
_HAS_LETTER = re.compile(r"[^\W\d_]")


def segment(text: str, segmenter: str = "rjieba") -> list[str]:
    """Chinese words. rjieba (jieba-rs) gives jieba's output ~12x faster; jieba is the fallback and reference."""
    if segmenter == "rjieba":
        try:
            import rjieba

            return rjieba.cut(text)
        except ImportError:  # pragma: no cover
            pass
    import jieba

    return jieba.lcut(text)


def tokens_of(text: str, lang: str, segmenter: str = "rjieba") -> list[str]:
    if lang == "zh":
        return [w for w in segment(text, segmenter) if not w.isspace()]
    return _EN_TOKEN.findall(text)


def words_of(doc: dict, cfg: Config) -> list[str]:
    """Content words of the document's current text (cached in the doc until the text changes)."""
    words = doc.get("_words")
    if words is None:
        lang = doc.get("lang") or detect_lang(doc["text"], cfg)
        words = [w for w in tokens_of(doc["text"], lang, cfg.segmenter) if _ALNUM.search(w)]
        doc["_words"] = words
    return words


# ---------------------------------------------------------------------------------------------------
# 3. quality

STOP_WORDS = {
    "en": frozenset(["the", "be", "to", "of", "and", "that", "have", "with"]),  # Gopher's list
    # Chinese function words: particles, conjunctions, prepositions, modal verbs
    "zh": frozenset("的 了 是 在 和 与 或 及 对 为 不 也 就 都 而 并 等 中 有 这 其 之 所 以 于 由 将 被 把 从 向 但 "
                    "如 则 按照 依照 根据 为了 应当 可以 我们 他们 一个".split()),
}
_BULLETS = ("•", "-", "*", "·", "●", "○", "■", "□", "◆", "▪", "►", "‣")


def _lang_key(doc: dict) -> str:
    return "zh" if doc.get("lang") == "zh" else "en"


def quality_signals(doc: dict, cfg: Config) -> dict:
    text = doc["text"]
    words = words_of(doc, cfg)
    n = len(words)
    lines = [line for line in text.split("\n") if line.strip()] or [text]
    word_chars = max(sum(map(len, words)), 1)
    if "_top2" not in doc:  # shared with the repetition step
        doc["_top2"] = top_ngram_chars(words, 2) / word_chars if len(words) >= 4 else 0.0
    lowered = {w.lower() for w in words} if _lang_key(doc) == "en" else set(words)
    return {
        "words": n,
        "mean_word_len": sum(map(len, words)) / n if n else 0.0,
        "hash_ratio": text.count("#") / max(n, 1),
        "ellipsis_ratio": (text.count("...") + text.count("…")) / max(n, 1),
        "bullet_lines": sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines),
        "ellipsis_lines": sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines),
        "alpha_words": sum(1 for w in words if _HAS_LETTER.search(w)) / n if n else 0.0,
        "stop_words": len(lowered & STOP_WORDS[_lang_key(doc)]),
        "top2": doc["_top2"],
    }


def quality_score(q: dict, min_words: int) -> float:
    """One number per document for the histogram only (not used to filter): share of words with a
    letter x (1 - word-character share of the top 2-gram) x length sufficiency."""
    return q["alpha_words"] * (1.0 - min(1.0, q["top2"])) * min(1.0, q["words"] / max(min_words, 1))


def step_quality(doc: dict, cfg: Config, ctx: dict) -> str | None:
    lang = _lang_key(doc)
    q = quality_signals(doc, cfg)
    bound = lambda name: getattr(cfg, f"{name}_{lang}")  # noqa: E731
    doc["quality"] = round(quality_score(q, bound("min_words")), 4)
    if q["words"] < bound("min_words"):
        return "too_few_words"
    if q["words"] > bound("max_words"):
        return "too_many_words"
    if q["mean_word_len"] < bound("min_mean_word_len"):
        return "short_words"
    if q["mean_word_len"] > bound("max_mean_word_len"):
        return "long_words"
    if max(q["hash_ratio"], q["ellipsis_ratio"]) > cfg.max_symbol_word_ratio:
        return "symbols"
    if q["bullet_lines"] > cfg.max_bullet_lines:
        return "bullet_lines"
    if q["ellipsis_lines"] > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    if q["alpha_words"] < bound("min_alpha_words"):
        return "non_alpha"
    if q["stop_words"] < bound("min_stop_words"):
        return "few_stop_words"
    return None


# ---------------------------------------------------------------------------------------------------
# 4. repetition

_PARAGRAPHS = re.compile(r"\n{2,}")


def _dup_items(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the most frequent n-gram times its count (0 unless it occurs twice or more)."""
    counts = Counter(zip(*(words[i:] for i in range(n))))
    if not counts:
        return 0
    gram, count = counts.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by any n-gram that occurs more than once (each word once)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c)


def step_repetition(doc: dict, cfg: Config, ctx: dict) -> str | None:
    text = doc["text"]
    size = max(len(text), 1)
    paragraphs = _PARAGRAPHS.split(text)
    n_dup, chars = _dup_items(paragraphs)
    if n_dup / len(paragraphs) > cfg.max_dup_para_frac:
        return "dup_paragraphs"
    if chars / size > cfg.max_dup_para_char_frac:
        return "dup_paragraph_chars"
    lines = [line for line in text.split("\n") if line]
    n_dup, chars = _dup_items(lines)
    if n_dup / max(len(lines), 1) > cfg.max_dup_line_frac:
        return "dup_lines"
    if chars / size > cfg.max_dup_line_char_frac:
        return "dup_line_chars"
    words = words_of(doc, cfg)
    word_chars = max(sum(map(len, words)), 1)
    lang = _lang_key(doc)
    for n, limit in zip((2, 3, 4), getattr(cfg, f"top_ngram_char_frac_{lang}")):
        if len(words) < 2 * n:
            break
        top = round(doc["_top2"] * word_chars) if n == 2 and "_top2" in doc else top_ngram_chars(words, n)
        if top == 0:  # no n-gram repeats, so no longer one does either
            break
        if top / word_chars > limit:
            return f"top_{n}gram"
    for n, limit in zip(range(5, 11), getattr(cfg, f"dup_ngram_char_frac_{lang}")):
        if len(words) < 2 * n:
            break
        dup = dup_ngram_chars(words, n)
        if dup == 0:  # a repeated (n+1)-gram contains a repeated n-gram
            break
        if dup / word_chars > limit:
            return f"dup_{n}gram"
    return None


# ---------------------------------------------------------------------------------------------------
# 5. PII

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![A-Za-z0-9\-])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{3,39}(?![\w:])")
# Digits after a decimal point or glued to letters are not identifiers (tables print "64281.75661...").
_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z.])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z]|\.\d)")
_BANK_CARD = re.compile(r"(?<![0-9A-Za-z.])(?:\d{4}[ -]){2,4}\d{1,4}(?![0-9A-Za-z]|\.\d)"
                        r"|(?<![0-9A-Za-z.])\d{13,19}(?![0-9A-Za-z]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{1,4}){1,4}(?![0-9A-Za-z])"  # international
    r"|(?<![0-9A-Za-z.])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![0-9A-Za-z]|\.\d)"  # CN mobile
    r"|(?<![0-9A-Za-z.])(?:[(（]0\d{2,3}[)）] ?|0\d{2,3}-)\d{7,8}(?:-\d{1,4})?(?![0-9A-Za-z]|\.\d)"  # CN landline
)


def id_number_valid(s: str) -> bool:
    """PRC resident ID: ISO 7064 MOD 11-2 check digit and a real birth date."""
    if len(s) != 18 or not s[:17].isdigit():
        return False
    try:
        time.strptime(s[6:14], "%Y%m%d")
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_valid(s: str) -> bool:
    if s.count(":") < 2 or re.fullmatch(r"[\d:]{1,8}", s):  # 12:30:45 is a time, not an address
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def _card_valid(s: str) -> bool:
    digits = re.sub(r"[ -]", "", s)
    # an 18-digit number shaped like a resident ID belongs to the ID rule (valid or not)
    return 13 <= len(digits) <= 19 and not _ID_NUMBER.fullmatch(digits) and luhn_valid(digits)


def _phone_valid(s: str) -> bool:
    return s[0] != "+" or 8 <= sum(c.isdigit() for c in s) <= 15


# Applied in this order (e-mails and IPs contain digits that later rules would take). Each rule has a
# cheap pre-check so that the full pattern only runs on texts that can match.
_PII_RULES = {
    "email": (re.compile("@"), _EMAIL, "<EMAIL>", None),
    "ip": (re.compile(r"\d\.\d{1,3}\.\d"), _IPV4, "<IP>", None),
    "ip6": (re.compile(r":[0-9A-Fa-f]*:"), _IPV6, "<IP>", _ipv6_valid),
    "id_number": (re.compile(r"\d{17}"), _ID_NUMBER, "<ID_NUMBER>", id_number_valid),
    "bank_card": (re.compile(r"\d{13}|\d{4}[ -]\d{4}[ -]\d{4}"), _BANK_CARD, "<BANK_CARD>", _card_valid),
    "phone": (re.compile(r"\+\d|\d{7}|\d{3}[ -]\d{4}|[(（]0\d"), _PHONE, "<PHONE>", _phone_valid),
}


def redact_pii(text: str, types) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for rule, (precheck, pattern, placeholder, valid) in _PII_RULES.items():
        if ("ip" if rule == "ip6" else rule) not in types or not precheck.search(text):
            continue
        hits = 0

        def replace(m: re.Match) -> str:
            nonlocal hits
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            hits += 1
            return placeholder

        text = pattern.sub(replace, text)
        if hits:
            tag = placeholder.strip("<>")
            counts[tag] = counts.get(tag, 0) + hits
    return text, counts


def step_pii(doc: dict, cfg: Config, ctx: dict) -> str | None:
    text, counts = redact_pii(doc["text"], cfg.pii_types)
    if counts:
        doc["text"] = text
        doc.pop("_words", None)
        doc.pop("_top2", None)
        doc["pii"] = counts
    return None


# ---------------------------------------------------------------------------------------------------
# 6. decontamination

def eval_ngrams(texts, cfg: Config) -> tuple[set[str], set[str]]:
    """All word n-grams of the eval texts, and the set of their first words (a cheap pre-check)."""
    n = cfg.decontam_ngram
    grams: set[str] = set()
    for text in texts:
        lang = detect_lang(text, cfg)
        words = [w.lower() for w in tokens_of(normalize_text(text, cfg), lang, cfg.segmenter) if _ALNUM.search(w)]
        grams.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams, {g.split(" ", 1)[0] for g in grams}


def step_decontam(doc: dict, cfg: Config, ctx: dict) -> str | None:
    if doc.get("id") in ctx.get("exclude_ids", ()):
        return "excluded_id"
    grams, firsts = ctx.get("eval_grams", ()), ctx.get("eval_firsts", ())
    if not grams:
        return None
    n = cfg.decontam_ngram
    words = [w.lower() for w in words_of(doc, cfg)]
    for i in range(len(words) - n + 1):
        if words[i] in firsts and " ".join(words[i:i + n]) in grams:
            return "eval_overlap"
    return None


# ---------------------------------------------------------------------------------------------------
# fingerprint (per-document half of deduplication)

_MINHASH_TEMPLATES: dict = {}
_WHITESPACE = re.compile(r"\s+")


def _minhash_template(num_perm: int, seed: int):
    from datasketch import MinHash

    key = (num_perm, seed)
    if key not in _MINHASH_TEMPLATES:
        _MINHASH_TEMPLATES[key] = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)
    return _MINHASH_TEMPLATES[key]


def minhash_signature(words: list[str], cfg: Config) -> bytes:
    n = cfg.minhash_ngram
    words = [w.lower() for w in words]
    shingles = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)} or {" ".join(words)}
    m = _minhash_template(cfg.minhash_num_perm, cfg.seed)  # one reusable sketch per process: clear, fill, read
    m.clear()
    m.update_batch(shingles)
    return m.hashvalues.astype("<u4").tobytes()


def step_fingerprint(doc: dict, cfg: Config, ctx: dict) -> str | None:
    doc["key"] = xxhash.xxh3_64_hexdigest(_WHITESPACE.sub("", doc["text"]).casefold())
    if "near_dedup" in cfg.steps:
        doc["sig"] = minhash_signature(words_of(doc, cfg), cfg)
    return None


STEP_FUNCS = {"normalize": step_normalize, "language": step_language, "quality": step_quality,
              "repetition": step_repetition, "pii": step_pii, "decontam": step_decontam,
              "fingerprint": step_fingerprint}


def doc_plan(cfg: Config) -> list[str]:
    """Per-document steps to run, in order. Language detection always runs (the rules need it)."""
    plan = [s for s in DOC_STEPS if s in cfg.steps or s == "language"]
    if "exact_dedup" in cfg.steps or "near_dedup" in cfg.steps:
        plan.append("fingerprint")
    return plan


def process_doc(doc: dict, plan: list[str], cfg: Config, ctx: dict, times: list[int]) -> str:
    """Run the plan on one document; returns '' (kept) or 'step:reason'. Adds ns per step to times."""
    for j, name in enumerate(plan):
        t0 = time.perf_counter_ns()
        reason = STEP_FUNCS[name](doc, cfg, ctx)
        times[j] += time.perf_counter_ns() - t0
        if reason:
            return f"{name}:{reason}"
    return ""


def _result(doc: dict, drop: str) -> dict:
    return {"idx": doc["idx"], "drop": drop, "text": "" if drop else doc["text"], "lang": doc.get("lang", ""),
            "n_norm": doc.get("n_norm", -1), "n_final": len(doc["text"]),
            "pii": json.dumps(doc.get("pii", {}), sort_keys=True), "quality": doc.get("quality", float("nan")),
            "key": doc.get("key", ""), "sig": doc.get("sig", b"")}


# ---------------------------------------------------------------------------------------------------
# Engines

def _map_batch(batch: dict, plan: list[str], cfg: Config, ctx: dict) -> dict:
    out: dict[str, list] = defaultdict(list)
    for idx, doc_id, text in zip(batch["idx"], batch["id"], batch["text"]):
        doc = {"idx": idx, "id": doc_id, "text": text}
        times = [0] * len(plan)
        for key, value in _result(doc, process_doc(doc, plan, cfg, ctx, times)).items():
            out[key].append(value)
        out["t_ns"].append(times)
    return dict(out)


def run_datasets(docs: list[dict], plan: list[str], cfg: Config, ctx: dict) -> tuple[list[dict], list[float]]:
    import datasets

    if os.environ.get("DF_NO_PROGRESS") == "1":
        datasets.disable_progress_bars()
    # map(num_proc=k) cuts the rows into k contiguous shards; interleaving the rows first gives each process
    # the same mix of sources (cheap short law articles, long news) instead of one process doing all the news.
    order = sorted(docs, key=lambda d: (d["idx"] % cfg.num_proc, d["idx"]))
    ds = datasets.Dataset.from_dict({"idx": [d["idx"] for d in order], "id": [d["id"] for d in order],
                                     "text": [d["text"] for d in order]})
    out = ds.map(_map_batch, batched=True, batch_size=256, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                 fn_kwargs={"plan": plan, "cfg": cfg, "ctx": ctx}, remove_columns=ds.column_names,
                 new_fingerprint=f"df01-{cfg.seed}-{len(docs)}", desc="per-document steps")
    seconds = np.asarray(out["t_ns"], dtype=np.int64).reshape(-1, len(plan)).sum(axis=0) / 1e9 if len(out) else \
        np.zeros(len(plan))
    results = sorted(out.remove_columns(["t_ns"]).to_list(), key=lambda r: r["idx"])
    return results, [float(s) for s in seconds]


if BaseFilter is not None:

    class DocStep(BaseFilter):
        """One per-document step of this stage as a datatrove filter (drops go to the exclusion writer)."""

        def __init__(self, step: str, cfg: Config, ctx: dict, exclusion_writer=None):
            self.name = f"df01 {step}"
            super().__init__(exclusion_writer)
            self.step, self.cfg, self.ctx = step, cfg, ctx

        def filter(self, doc):
            d = doc.metadata
            d["text"] = doc.text
            reason = STEP_FUNCS[self.step](d, self.cfg, self.ctx)
            doc.text = d.pop("text")
            return (False, reason) if reason else True


def _dt_kept(writer, document) -> dict:
    meta = {k: v for k, v in document.metadata.items() if not k.startswith("_")}
    if "sig" in meta:
        meta["sig"] = base64.b64encode(meta["sig"]).decode("ascii")
    return {"text": document.text, "meta": meta}


def _dt_rejected(writer, document) -> dict:
    meta = {k: v for k, v in document.metadata.items() if not k.startswith("_") and k not in ("sig",)}
    return {"text": document.text, "meta": meta}


def run_datatrove(docs: list[dict], plan: list[str], cfg: Config, ctx: dict) -> tuple[list[dict], list[float]]:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    results = {}
    for d in docs:  # datatrove's readers skip empty texts: run those few here, through the same functions
        if not d["text"]:
            doc = {"idx": d["idx"], "id": d["id"], "text": ""}
            results[d["idx"]] = _result(doc, process_doc(doc, plan, cfg, ctx, [0] * len(plan)))
    todo = [d for d in docs if d["text"]]
    work = Path(tempfile.mkdtemp(prefix="df01_datatrove_"))
    try:
        tasks = max(1, min(cfg.num_proc, len(todo)))
        for t in range(tasks):  # interleaved shards: every task gets the same mix of sources
            write_jsonl(work / "input" / f"{t:05d}.jsonl",
                        ({"id": str(d["idx"]), "text": d["text"], "metadata": {"idx": d["idx"], "id": d["id"]}}
                         for d in todo[t::tasks]))
        pipeline = [JsonlReader(str(work / "input"), glob_pattern="*.jsonl", compression=None, add_file_path=False)]
        for step in plan:
            rejected = JsonlWriter(str(work / "rejected" / step), output_filename="${rank}.jsonl", compression=None,
                                   adapter=_dt_rejected)
            pipeline.append(DocStep(step, cfg, ctx if step == "decontam" else {}, exclusion_writer=rejected))
        pipeline.append(JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl", compression=None,
                                    adapter=_dt_kept))
        executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(work / "logs"),
                                         skip_completed=False, start_method=cfg.datatrove_start_method)
        stats = executor.run()
        seconds = []
        for step in plan:
            match = [s for s in stats.stats if s.name.endswith(f"df01 {step}")]
            seconds.append(float(match[0].time_stats.total) if match else 0.0)
        for path in sorted((work / "kept").glob("*.jsonl")):
            for line in path.open(encoding="utf-8"):
                rec = json.loads(line)
                meta = rec["meta"]
                meta["text"] = rec["text"]
                if "sig" in meta:
                    meta["sig"] = base64.b64decode(meta["sig"])
                results[meta["idx"]] = _result(meta, "")
        for step in plan:
            for path in sorted((work / "rejected" / step).glob("*.jsonl")):
                for line in path.open(encoding="utf-8"):
                    rec = json.loads(line)
                    meta = rec["meta"]
                    meta["text"] = rec["text"]
                    results[meta["idx"]] = _result(meta, f"{step}:{meta.get('filter_reason', 'dropped')}")
        missing = len(docs) - len(results)
        if missing:
            raise RuntimeError(f"datatrove returned {len(results)} of {len(docs)} documents")
        return [results[d["idx"]] for d in docs], seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Reading sources, SFT stages and eval sets

def parse_named(spec: str) -> tuple[str | None, str]:
    """'name=path' -> (name, path); a plain path -> (None, path). SQL after '::' may contain '='."""
    m = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", spec)
    return (m.group(1), m.group(2)) if m and not os.path.exists(spec) else (None, spec)


def _default_name(src: str) -> str:
    return Path(src.split("::", 1)[0].rstrip("/")).stem or "source"


def read_sources(cfg: Config) -> tuple[list[dict], dict, list[tuple[str, str, str]]]:
    docs: list[dict] = []
    info: dict[str, dict] = {}
    sources: list[tuple[str, str, str]] = []
    for kind, specs in (("domain", cfg.domain), ("general", cfg.general)):
        for spec in specs:
            name, src = parse_named(spec)
            name = name or _default_name(src)
            base, k = name, 2
            while name in info:
                name, k = f"{base}_{k}", k + 1
            stats = ReadStats()
            n = 0
            holdout_checked = False
            for rec in read_records(src, text_field=cfg.text_field, stats=stats, txt_mode=cfg.txt_mode):
                if kind == "domain" and cfg.holdout_field and not holdout_checked:
                    holdout_checked = True
                    if cfg.holdout_field not in rec:
                        fields = ", ".join(k for k in rec if not k.startswith("_"))
                        raise UserError(f"{rec['_source']}:{rec['_line']}: no field '{cfg.holdout_field}' "
                                        f"for --holdout_field (fields: {fields})")
                doc_id = rec.get(cfg.id_field)
                meta = {k: v for k, v in rec.items() if not k.startswith("_") and k not in (cfg.text_field, cfg.id_field)}
                docs.append({"idx": len(docs), "id": str(doc_id) if doc_id is not None else f"{name}:{rec['_line']}",
                             "text": rec[cfg.text_field], "source": name, "kind": kind, "meta": meta})
                n += 1
                if cfg.max_docs_per_source and n >= cfg.max_docs_per_source:
                    break
            if n == 0:
                raise UserError(f"{src}: no documents with a text field '{cfg.text_field}' (empty source)")
            info[name] = {"kind": kind, "path": src, "read": stats.as_dict()}
            sources.append((name, kind, src))
            log.info("read %s (%s): %d documents, %d malformed, %d undecodable", name, kind, n, stats.malformed,
                     stats.undecodable)
    return docs, info, sources


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if not str(k).startswith("_") for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def _find_split(folder: Path, split: str) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.name.split(".")[0] == split and not p.name.startswith("."))
    return found[0] if found else None


def load_sft(cfg: Config) -> tuple[dict, dict, list[str]]:
    """SFT stages as {"<k>_<name>": (train, test)}, their stats, and the test texts (for decontamination)."""
    stages, stats, test_texts = {}, {}, []
    for k, spec in enumerate(cfg.sft_stage, 1):
        name, src = parse_named(spec)
        if name is None:
            raise UserError(f"--sft_stage {spec!r}: expected NAME=SRC (e.g. law=data/demo/sft/2_law)")
        name = re.sub(r"^\d+_", "", name)
        read = ReadStats()
        path = Path(src)
        if path.is_dir() and _find_split(path, "train") is not None:
            train_src, test_src = _find_split(path, "train"), _find_split(path, "test")
            train = list(normalize_sft(read_records(str(train_src), stats=read), stats=read))
            test = list(normalize_sft(read_records(str(test_src), stats=read), stats=read)) if test_src else []
        else:
            records = list(normalize_sft(read_records(src, stats=read), stats=read))
            order = list(range(len(records)))
            random.Random(f"{cfg.seed}-sft-{name}").shuffle(order)
            n_test = max(1, round(len(records) * cfg.sft_test_fraction)) if len(records) > 1 and cfg.sft_test_fraction else 0
            test_idx = set(order[:n_test])
            train = [r for i, r in enumerate(records) if i not in test_idx]
            test = [r for i, r in enumerate(records) if i in test_idx]
        if not train:
            raise UserError(f"--sft_stage {spec}: no usable SFT records in {src}")
        for rec in train + test:
            for m in rec["messages"]:
                m["content"] = redact_pii(normalize_text(m["content"], cfg), cfg.pii_types)[0]
        for rec in test:
            test_texts.extend(m["content"] for m in rec["messages"] if m["role"] != "system")
        stages[f"{k}_{name}"] = ([_public(r) for r in train], [_public(r) for r in test])
        stats[f"{k}_{name}"] = {"path": src, "train": len(train), "test": len(test), "read": read.as_dict()}
        log.info("sft stage %d_%s: %d train, %d test, %d malformed", k, name, len(train), len(test), read.malformed)
    return stages, stats, test_texts


def load_eval(cfg: Config) -> tuple[dict, dict, list[str]]:
    """Eval sets as {name: records} (internal fields removed), their stats, and all their strings."""
    sets, stats, texts = {}, {}, []
    for spec in cfg.eval:
        name, src = parse_named(spec)
        path = Path(src)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"))
            if not files:
                raise UserError(f"--eval {src}: no eval files in this folder")
            items = [(f"{name}_{f.stem}" if name else f.stem, str(f)) for f in files]
        else:
            items = [(name or _default_name(src), src)]
        for set_name, file in items:
            if set_name in stats:
                raise UserError(f"--eval: two eval sets named '{set_name}'; name them with NAME=SRC")
            read = ReadStats()
            records = [_public(r) for r in read_records(file, stats=read)]
            if not records:
                raise UserError(f"--eval {file}: no records")
            sets[set_name] = records
            texts.extend(s for r in records for s in _strings(r))
            stats[set_name] = {"path": file, "records": len(records), "read": read.as_dict()}
    return sets, stats, texts


def read_excludes(cfg: Config) -> tuple[set[str], list[str], dict]:
    ids, texts, stats = set(), [], {}
    for src in cfg.exclude:
        read = ReadStats()
        n = 0
        for rec in read_records(src, stats=read):
            n += 1
            if rec.get(cfg.id_field) is not None:
                ids.add(str(rec[cfg.id_field]))
            if isinstance(rec.get(cfg.text_field), str):
                texts.append(rec[cfg.text_field])
        stats[src] = {"records": n, "read": read.as_dict()}
    return ids, texts, stats


# ---------------------------------------------------------------------------------------------------
# Global steps, split, mixture

def near_dedup(kept: list[dict], cfg: Config) -> set[int]:
    """Indexes (idx) of near-duplicates: query the LSH of documents kept so far, then insert."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.minhash_num_perm)
    dropped = set()
    for r in kept:
        m = LeanMinHash(seed=cfg.seed, hashvalues=np.frombuffer(r["sig"], dtype="<u4"), scheme="affine32")
        if lsh.query(m):
            dropped.add(r["idx"])
        else:
            lsh.insert(r["idx"], m, check_duplication=False)
    return dropped


def holdout_split(docs: list[dict], fraction: float, field_name: str, rng: random.Random) -> set[int]:
    """idx of held-out documents: whole groups (by field_name) in seeded order until `fraction` of docs."""
    if fraction <= 0 or not docs:
        return set()
    groups: dict[str, list[int]] = defaultdict(list)
    for d in docs:
        key = str(d["meta"].get(field_name, "")) if field_name else f"#{d['idx']}"
        groups[key].append(d["idx"])
    keys = sorted(groups)
    rng.shuffle(keys)
    target = fraction * len(docs)
    held: set[int] = set()
    for key in keys:
        if len(held) >= target:
            break
        size = len(groups[key])
        if held and len(held) + size > target * 1.5:  # a group that would overshoot by half waits
            continue
        held.update(groups[key])
    return held


def sample_chars(pool: list[dict], target: float, rng: random.Random) -> tuple[list[tuple[dict, int]], float]:
    """Pick documents to about `target` characters: whole passes of the pool, then a seeded greedy sample.
    Returns [(doc, copy)] and the number of passes (>1 means repetition)."""
    total = sum(len(d["text"]) for d in pool)
    if target <= 0 or total == 0:
        return [], 0.0
    passes = int(target // total)
    picks = [(d, k) for k in range(passes) for d in pool]
    remainder = target - passes * total
    order = list(pool)
    rng.shuffle(order)
    acc = 0
    for d in order:
        size = len(d["text"])
        if acc + size <= remainder:
            picks.append((d, passes))
            acc += size
        elif acc + size - remainder < remainder - acc:  # overshooting a little beats stopping short
            picks.append((d, passes))
            acc += size
            break
        if remainder - acc <= 0:
            break
    return picks, target / total


# ---------------------------------------------------------------------------------------------------
# Report and plot

def _fmt_int(n) -> str:
    return f"{n:,}"


def write_report(path: Path, stats: dict) -> None:
    names = list(stats["sources"])
    lines = ["# 01_corpus report", "",
             f"engine `{stats['engine']}`, num_proc {stats['num_proc']}, seed {stats['seed']}, "
             f"steps: {' '.join(stats['steps'])}", "", "## Read", "",
             "| source | kind | path | records | malformed | undecodable |", "|---|---|---|---:|---:|---:|"]
    for name in names:
        s = stats["sources"][name]
        r = s["read"]
        lines.append(f"| {name} | {s['kind']} | `{s['path']}` | {_fmt_int(r['read'])} | {_fmt_int(r['malformed'])} | "
                     f"{_fmt_int(r['undecodable'])} |")
    malformed = [(n, reason, c) for n in names for reason, c in stats["sources"][n]["read"]["by_reason"].items()]
    if malformed:
        lines += ["", "Malformed records skipped: " + "; ".join(f"{n}: {c} x {reason}" for n, reason, c in malformed)]
    lines += ["", "## Funnel (documents kept after each step)", "",
              "| step | " + " | ".join(names) + " | total | chars out |", "|---|" + "---:|" * (len(names) + 2)]
    first = stats["sources"][names[0]]["steps"]
    lines.append("| read | " + " | ".join(_fmt_int(stats["sources"][n]["read"]["read"]) for n in names) + " | "
                 + _fmt_int(sum(stats["sources"][n]["read"]["read"] for n in names)) + " | |")
    for step in first:
        outs = [stats["sources"][n]["steps"][step]["out"] for n in names]
        chars = sum(stats["sources"][n]["steps"][step]["chars_out"] for n in names)
        lines.append(f"| {step} | " + " | ".join(_fmt_int(o) for o in outs) + f" | {_fmt_int(sum(outs))} | {_fmt_int(chars)} |")
    lines += ["", "## Dropped by reason", "", "| step | reason | " + " | ".join(names) + " |",
              "|---|---|" + "---:|" * len(names)]
    for step in first:
        reasons = sorted({r for n in names for r in stats["sources"][n]["steps"][step]["dropped"]})
        for reason in reasons:
            lines.append(f"| {step} | {reason} | " + " | ".join(
                _fmt_int(stats["sources"][n]["steps"][step]["dropped"].get(reason, 0)) for n in names) + " |")
    if "pii" in first:
        kinds = sorted({k for n in names for k in stats["sources"][n]["steps"]["pii"].get("redactions", {})})
        lines += ["", "## PII redactions", ""]
        if kinds:
            lines += ["| placeholder | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            for kind in kinds:
                lines.append(f"| <{kind}> | " + " | ".join(
                    _fmt_int(stats["sources"][n]["steps"]["pii"]["redactions"].get(kind, 0)) for n in names) + " |")
        else:
            lines.append("none found")
    lines += ["", "## Throughput", "",
              "Per-document steps: seconds summed over processes (per-process throughput); MB = UTF-8 megabytes "
              "of input text entering the step.", "",
              "| step | docs in | seconds | docs/s | MB/s |", "|---|---:|---:|---:|---:|"]
    for step, t in stats["timing"].items():
        lines.append(f"| {step} | {_fmt_int(t['docs'])} | {t['seconds']:.2f} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.2f} |")
    mix = stats["mixture"]
    lines += ["", "## Splits and mixture", "",
              f"Replay ratio = share of CHARACTERS from general text in train. Target {mix['target_ratio']:.3f}, "
              f"achieved **{mix['achieved_ratio']:.4f}**.", ""]
    for note in mix["notes"]:
        lines.append(f"- {note}")
    lines += ["", "| part | source | docs | chars | share of train chars |", "|---|---|---:|---:|---:|"]
    for name in names:
        t = stats["sources"][name]["mixture"]
        lines.append(f"| train | {name} | {_fmt_int(t['docs'])} | {_fmt_int(t['chars'])} | {t['share']:.4f} |")
    for part in ("validation_domain", "validation_general"):
        v = stats["splits"][part]
        lines.append(f"| {part} | all | {_fmt_int(v['docs'])} | {_fmt_int(v['chars'])} | |")
    if stats["splits"].get("holdout_groups"):
        lines.append(f"\nDomain validation holds out {stats['splits']['holdout_groups']} whole groups by "
                     f"`{stats['splits']['holdout_field']}`.")
    if stats["sft"]:
        lines += ["", "## SFT stages", "", "| stage | train | test | malformed |", "|---|---:|---:|---:|"]
        for name, s in stats["sft"].items():
            lines.append(f"| {name} | {_fmt_int(s['train'])} | {_fmt_int(s['test'])} | {_fmt_int(s['read']['malformed'])} |")
    if stats["eval"]:
        lines += ["", "## Eval sets", "", "| set | records | malformed |", "|---|---:|---:|"]
        for name, s in stats["eval"].items():
            lines.append(f"| {name} | {_fmt_int(s['records'])} | {_fmt_int(s['read']['malformed'])} |")
    d = stats["decontam"]
    lines += ["", f"Decontamination: {_fmt_int(d['eval_ngrams'])} distinct {d['ngram']}-grams from {_fmt_int(d['eval_texts'])} "
              f"eval texts, {_fmt_int(d['exclude_ids'])} excluded ids.", ""]
    atomic_write_text(path, "\n".join(lines))


def plot_lengths(path: Path, train: list[dict], quality_kept: list[float], quality_dropped: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, color in (("domain", "tab:blue"), ("general", "tab:orange")):
        lengths = [len(r["text"]) for r in train if r["kind"] == kind and r["copy"] == 0]
        if lengths:
            axes[0].hist(np.log10(lengths), bins=50, alpha=0.6, color=color, label=f"{kind} ({len(lengths)})")
    axes[0].set_xlabel("log10(characters)")
    axes[0].set_ylabel("documents")
    axes[0].set_title("train document lengths")
    axes[0].legend()
    bins = np.linspace(0, 1, 41)
    if quality_kept:
        axes[1].hist(quality_kept, bins=bins, alpha=0.6, label=f"kept ({len(quality_kept)})")
    if quality_dropped:
        axes[1].hist(quality_dropped, bins=bins, alpha=0.6, label=f"dropped by filters ({len(quality_dropped)})")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("letter-word share x (1 - top 2-gram share) x length factor")
    axes[1].set_title("quality score (log scale)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------

def _row(d: dict, copy: int) -> dict:
    return {"id": d["id"], "text": d["text"], "source": d["source"], "kind": d["kind"], "lang": d["lang"],
            "copy": copy, "meta": d["meta"]}


def global_dedup(results: list[dict], cfg: Config) -> tuple[list[dict], dict]:
    """Exact, then near-duplicate removal over the documents the per-document steps kept, in input order.
    Marks r["drop"] on the results; returns the survivors and the seconds per step."""
    kept = [r for r in results if not r["drop"]]
    seconds = {}
    if "exact_dedup" in cfg.steps:
        t0 = time.perf_counter()
        seen: set[str] = set()
        for r in kept:
            if r["key"] in seen:
                r["drop"] = "exact_dedup:exact_duplicate"
            seen.add(r["key"])
        kept = [r for r in kept if not r["drop"]]
        seconds["exact_dedup"] = time.perf_counter() - t0
    if "near_dedup" in cfg.steps:
        t0 = time.perf_counter()
        dup = near_dedup(kept, cfg)
        for r in kept:
            if r["idx"] in dup:
                r["drop"] = "near_dedup:near_duplicate"
        kept = [r for r in kept if not r["drop"]]
        seconds["near_dedup"] = time.perf_counter() - t0
    return kept, seconds


def split_and_mix(pool: list[dict], sources: list[tuple[str, str, str]], cfg: Config) -> dict:
    """Held-out validation splits, then the train mixture at --replay_ratio (share of characters)."""
    domain_pool = [d for d in pool if d["kind"] == "domain"]
    val_domain = holdout_split(domain_pool, cfg.validation_fraction, cfg.holdout_field,
                               random.Random(f"{cfg.seed}-holdout"))
    val_general: set[int] = set()
    for name, kind, _ in sources:
        if kind == "general":
            part = [d for d in pool if d["source"] == name]
            val_general |= holdout_split(part, cfg.general_validation_fraction, "", random.Random(f"{cfg.seed}-val-{name}"))
    train_domain = [d for d in domain_pool if d["idx"] not in val_domain]
    train_general = [d for d in pool if d["kind"] == "general" and d["idx"] not in val_general]
    dom_chars = sum(len(d["text"]) for d in train_domain)
    gen_chars = sum(len(d["text"]) for d in train_general)
    ratio, notes = cfg.replay_ratio, []
    if ratio > 0 and not train_general:
        raise UserError(f"no general documents left after filtering; cannot reach --replay_ratio {ratio} "
                        "(rerun with --replay_ratio 0 to see the funnel)")
    if cfg.mixture_size:
        dom_target, gen_target = (1 - ratio) * cfg.mixture_size, ratio * cfg.mixture_size
    elif ratio >= 1.0:
        dom_target, gen_target = 0.0, float(gen_chars)
        notes.append("replay_ratio 1 without mixture_size: the general pool is kept whole and no domain text is used")
    else:
        dom_target, gen_target = float(dom_chars), ratio / (1 - ratio) * dom_chars
    dom_picks, dom_passes = sample_chars(train_domain, dom_target, random.Random(f"{cfg.seed}-mix-domain"))
    gen_picks, gen_passes = sample_chars(train_general, gen_target, random.Random(f"{cfg.seed}-mix-general"))
    for label, passes in (("domain", dom_passes), ("general", gen_passes)):
        if passes > 1:
            notes.append(f"{label} text UPSAMPLED with repetition: the target is {passes:.2f}x the {label} train pool")
            log.warning("%s pool too small for the mixture target: repeated %.2fx", label, passes)
        elif passes > 0:
            notes.append(f"{label}: {passes:.3f} of the train pool sampled")
    train = [_row(d, c) for d, c in dom_picks + gen_picks]
    if not train:
        raise UserError("the train mixture is empty: every document was filtered out (see the funnel in the log)")
    train.sort(key=lambda r: (r["kind"], r["id"], r["copy"]))
    random.Random(f"{cfg.seed}-shuffle").shuffle(train)
    train_chars = sum(len(r["text"]) for r in train)
    return {
        "train": train,
        "validation_domain": [_row(d, 0) for d in domain_pool if d["idx"] in val_domain],
        "validation_general": [_row(d, 0) for d in pool if d["idx"] in val_general],
        "holdout_groups": len({str(d["meta"].get(cfg.holdout_field, "")) for d in domain_pool if d["idx"] in val_domain})
        if cfg.holdout_field else 0,
        "mixture": {"unit": "characters", "target_ratio": ratio,
                    "achieved_ratio": sum(len(r["text"]) for r in train if r["kind"] == "general") / train_chars,
                    "train_docs": len(train), "train_chars": train_chars,
                    "domain_pool_chars": dom_chars, "general_pool_chars": gen_chars,
                    "domain_passes": dom_passes, "general_passes": gen_passes, "notes": notes},
    }


def funnel(docs: list[dict], results: list[dict], plan: list[str], cfg: Config, source_info: dict,
           raw_chars: list[int], raw_bytes: list[int]) -> tuple[dict, Counter, Counter]:
    """Per source and step: documents in/out, dropped by reason, characters in/out, PII redactions.
    Also the documents and UTF-8 bytes entering each step (for throughput)."""
    steps = plan + [s for s in GLOBAL_STEPS if s in cfg.steps]
    per_source = {name: {**info, "steps": {s: {"in": 0, "out": 0, "dropped": {}, "chars_in": 0, "chars_out": 0,
                                               **({"redactions": {}} if s == "pii" else {})} for s in steps}}
                  for name, info in source_info.items()}
    pii_index = plan.index("pii") if "pii" in plan else len(plan)

    def chars_before(j: int, raw: int, r: dict) -> int:  # characters of a document entering step j
        if j == 0 and plan[0] == "normalize":
            return raw
        if j <= pii_index:
            return r["n_norm"] if r["n_norm"] >= 0 else raw
        return r["n_final"]

    docs_in, bytes_in = Counter(), Counter()
    for d, r, raw, nbytes in zip(docs, results, raw_chars, raw_bytes):
        entries = per_source[d["source"]]["steps"]
        drop_step, _, reason = r["drop"].partition(":")
        for j, step in enumerate(steps):
            entry = entries[step]
            entry["in"] += 1
            entry["chars_in"] += chars_before(j, raw, r)
            docs_in[step] += 1
            bytes_in[step] += nbytes
            if step == drop_step:
                entry["dropped"][reason] = entry["dropped"].get(reason, 0) + 1
                break
            entry["out"] += 1
            entry["chars_out"] += chars_before(j + 1, raw, r)
            if step == "pii":
                for kind, n in json.loads(r["pii"]).items():
                    entry["redactions"][kind] = entry["redactions"].get(kind, 0) + n
    return per_source, docs_in, bytes_in


def _rate(docs: int, nbytes: int, seconds: float) -> dict:
    secs = max(seconds, 1e-9)
    return {"docs": docs, "seconds": round(seconds, 4), "docs_per_s": docs / secs, "mb_per_s": nbytes / 1e6 / secs}


def main(cfg: Config) -> dict:
    t_start = time.perf_counter()
    cfg.validate()
    out = resolve_output_dir(cfg.output_dir or None, cfg.run_dir or None, "01_corpus")
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise UserError(f"{out} is not empty; pass --overwrite to replace it or --resume to continue")
    # Everything is read and checked before the folder is touched: a bad input leaves no half-made stage.
    docs, source_info, sources = read_sources(cfg)
    sft_sets, sft_stats, sft_test_texts = load_sft(cfg)
    eval_sets, eval_stats, eval_texts = load_eval(cfg)
    exclude_ids, exclude_texts, exclude_stats = read_excludes(cfg)
    run = StageRun("01_corpus", out, cfg, overwrite=cfg.overwrite, resume=cfg.resume)
    for name, kind, src in sources:
        run.add_input(f"{kind}:{name}", src.split("::", 1)[0])
    for kind, specs in (("sft", cfg.sft_stage), ("eval", cfg.eval), ("exclude", cfg.exclude)):
        for spec in specs:
            name, src = parse_named(spec)
            run.add_input(f"{kind}:{name or _default_name(src)}", src.split("::", 1)[0])
    for name, (train, test) in sft_sets.items():
        write_jsonl(out / "sft" / name / "train.jsonl", train)
        write_jsonl(out / "sft" / name / "test.jsonl", test)
    for name, records in eval_sets.items():
        write_jsonl(out / "eval" / f"{name}.jsonl", records)

    ctx: dict = {}
    eval_all = eval_texts + sft_test_texts + exclude_texts
    if "decontam" in cfg.steps:
        t0 = time.perf_counter()
        grams, firsts = eval_ngrams(eval_all, cfg)
        ctx = {"eval_grams": grams, "eval_firsts": firsts, "exclude_ids": exclude_ids}
        log.info("decontamination index: %d %d-grams from %d texts (%.1fs)", len(grams), cfg.decontam_ngram,
                 len(eval_all), time.perf_counter() - t0)

    # Per-document steps, through the chosen engine.
    plan = doc_plan(cfg)
    raw_chars = [len(d["text"]) for d in docs]
    raw_bytes = [len(d["text"].encode("utf-8")) for d in docs]
    t0 = time.perf_counter()
    engine = run_datasets if cfg.engine == "datasets" else run_datatrove
    results, step_seconds = engine(docs, plan, cfg, ctx)
    doc_wall = time.perf_counter() - t0
    log.info("per-document steps (%s, %d proc): %d docs in %.1fs", cfg.engine, cfg.num_proc, len(docs), doc_wall)
    for d, r in zip(docs, results):
        d["lang"] = r["lang"]
        d["text"] = r["text"]  # cleaned text ("" for dropped documents)

    # Global steps, split and mixture, outputs.
    kept, global_seconds = global_dedup(results, cfg)
    t0 = time.perf_counter()
    pool = [docs[r["idx"]] for r in kept]
    parts = split_and_mix(pool, sources, cfg)
    for part in ("train", "validation_domain", "validation_general"):
        write_jsonl(out / f"{part}.jsonl", parts[part])
    mix_seconds = time.perf_counter() - t0

    # Statistics, report, plot, manifest.
    per_source, docs_in, bytes_in = funnel(docs, results, plan, cfg, source_info, raw_chars, raw_bytes)
    train_chars = parts["mixture"]["train_chars"]
    for name in per_source:
        rows = [r for r in parts["train"] if r["source"] == name]
        chars = sum(len(r["text"]) for r in rows)
        per_source[name]["mixture"] = {"docs": len(rows), "chars": chars, "share": chars / train_chars,
                                       "repeated_docs": sum(1 for r in rows if r["copy"] > 0)}
        per_source[name]["split"] = {part: sum(1 for r in parts[part] if r["source"] == name)
                                     for part in ("validation_domain", "validation_general")}
    timing = {step: _rate(docs_in[step], bytes_in[step], secs) for step, secs in zip(plan, step_seconds)}
    timing.update({step: _rate(docs_in[step], bytes_in[step], secs) for step, secs in global_seconds.items()})
    timing["per-document steps (wall)"] = _rate(len(docs), sum(raw_bytes), doc_wall)
    timing["split + mixture + write"] = _rate(len(pool), 0, mix_seconds)
    stats = {
        "engine": cfg.engine, "num_proc": cfg.num_proc, "seed": cfg.seed,
        "steps": plan + [s for s in GLOBAL_STEPS if s in cfg.steps],
        "sources": per_source, "timing": timing,
        "splits": {**{part: {"docs": len(parts[part]), "chars": sum(len(r["text"]) for r in parts[part])}
                      for part in ("validation_domain", "validation_general")},
                   "holdout_field": cfg.holdout_field, "holdout_groups": parts["holdout_groups"]},
        "mixture": parts["mixture"],
        "decontam": {"ngram": cfg.decontam_ngram, "eval_ngrams": len(ctx.get("eval_grams", ())),
                     "eval_texts": len(eval_all), "exclude_ids": len(exclude_ids), "exclude": exclude_stats},
        "sft": sft_stats, "eval": eval_stats,
    }
    atomic_write_json(out / "stats.json", stats)
    write_report(out / "report.md", stats)
    outputs = {"train": "train.jsonl", "validation_domain": "validation_domain.jsonl",
               "validation_general": "validation_general.jsonl", "stats": "stats.json", "report": "report.md"}
    if cfg.plot:
        q_kept = [r["quality"] for r in results if not r["drop"] and not math.isnan(r["quality"])]
        q_drop = [r["quality"] for r in results if r["drop"].startswith(("quality:", "repetition:"))
                  and not math.isnan(r["quality"])]
        plot_lengths(out / "lengths.png", parts["train"], q_kept, q_drop)
        outputs["lengths_plot"] = "lengths.png"
    for name in sft_stats:
        outputs[f"sft_{name}_train"] = f"sft/{name}/train.jsonl"
        outputs[f"sft_{name}_test"] = f"sft/{name}/test.jsonl"
    for name in eval_stats:
        outputs[f"eval_{name}"] = f"eval/{name}.jsonl"
    achieved = parts["mixture"]["achieved_ratio"]
    metrics = {"docs_in": len(docs), "docs_after_filters": len(pool), "train_docs": len(parts["train"]),
               "train_chars": train_chars, "validation_domain_docs": len(parts["validation_domain"]),
               "validation_general_docs": len(parts["validation_general"]), "replay_ratio_target": cfg.replay_ratio,
               "replay_ratio_achieved": round(achieved, 6),
               "malformed_records": sum(s["read"]["malformed"] for s in source_info.values()),
               "seconds": round(time.perf_counter() - t_start, 2)}
    run.finish(outputs, metrics)
    log.info("01_corpus: %d docs -> %d kept -> train %d docs / %s chars (general share %.3f), val %d + %d; %.1fs",
             len(docs), len(pool), len(parts["train"]), f"{train_chars:,}", achieved, len(parts["validation_domain"]),
             len(parts["validation_general"]), time.perf_counter() - t_start)
    return metrics


if __name__ == "__main__":
    run_main(main, Config)
