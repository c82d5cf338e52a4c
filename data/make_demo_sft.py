"""Demo SFT stages and eval sets, synthesized from the raw demo text by documented templates.

SOAEsV2 (arXiv 2505.04723) fine-tunes in two domain-progressive stages: first general instruction
data filtered for relevance to the domain (finance, law, business, politics), then domain QA, part
of it generated from domain documents. This script builds such stages for the demo from the real
text that `data/provision_demo.py` fetched, with fixed templates, so that every example can be
traced back to the record it came from:

    1_general  general instructions from Wikipedia (English) and People's Daily (Chinese)
    2_law      QA about PRC law articles (all law but the 3_soe articles)
    3_soe      the same QA restricted to state-owned-asset articles

Run (seconds on a CPU; the same seed gives byte-identical files):

    python data/make_demo_sft.py                                 # data/demo/raw -> data/demo/{sft,eval}
    python data/make_demo_sft.py --seed 1 --law_train 5000 --relevance_filter false

Reads (formats written by data/provision_demo.py):

    <raw_dir>/laws.jsonl           one PRC law article per line (law_name, article_no, chapter, status, ...)
    <raw_dir>/wiki_en.jsonl        Wikipedia lead paragraphs (title, text, description, topic)
    <raw_dir>/peoples_daily.jsonl  People's Daily articles, January 1998 (text, paragraphs joined by "\\n")
    <raw_dir>/bench/*.jsonl        general MCQ benchmarks (question, A, B, ..., answer letter); optional

Writes (every file atomically; records are chat `messages`, user then assistant, plus `id`,
`template` and `source_id` = the raw record the example came from):

    <out_dir>/sft/1_general/{train,test}.jsonl
    <out_dir>/sft/2_law/{train,test}.jsonl
    <out_dir>/sft/3_soe/{train,test}.jsonl
    <out_dir>/sft/heldout_articles.jsonl    every law article held out of training: id, law_name,
                                            article_no, text, used_by. 01_build_corpus.py removes
                                            them from the CPT mixture (and decontaminates by n-grams)
    <out_dir>/eval/law_mcq.jsonl            question, A, B, C, D, answer (letter)
    <out_dir>/eval/law_qa.jsonl             generation eval, chat messages
    <out_dir>/eval/general_ppl_bench.jsonl  general-retention text (see below); only if bench/ exists

Templates
---------
Wikipedia (one template per article, drawn at random among those that apply, so that a small set
still covers many different texts; "first sentences" are cut by a small abbreviation-aware splitter):

    wiki_what_is      "What is <title>?" ("Who is <title>?" for the topic People)
                          -> the first sentence of the extract
    wiki_describe     "Describe <title> briefly."  -> the first sentences, up to ~400 characters
    wiki_short        "In a few words, what is <title>?"  -> the Wikipedia short description
    wiki_summarize    "Summarize the following paragraph in one sentence.\\n\\n<extract>"
                          -> its first sentence (only extracts of 3+ sentences)

People's Daily (one template per article, same rule; the article body is cut at a paragraph end
to ~600 characters; the first line counts as a headline if it is short and has no sentence
punctuation):

    pd_summary        "请概括这篇报道的主要内容。\\n\\n<body>"  -> the lead sentence (first sentence
                          of the first real paragraph, which in news writing carries the gist),
                          without its dateline and byline ("本报北京１月１５日讯记者…报道：")
    pd_headline       "请为下面这篇报道拟一个标题。\\n\\n<body>"  -> the headline
    pd_dateline       "这篇报道是哪一天发出的？\\n\\n<body>"  -> the date of its dateline
                          ("本报北京１２月３１日讯" -> "这篇报道于１２月３１日发出。")
    We do not ask for the issue date itself: it is metadata that the text does not contain, and
    training on it would teach the model to guess dates.

Law articles (every template that applies to an article; only 现行有效 laws, only articles numbered
"第…条", at most `max_article_chars` long so that CPU fine-tuning stays short):

    law_recall        "《X》第N条规定了什么？"  -> the article text
    law_source        "下面这段条文出自哪部法律的哪一条？\\n<excerpt>"  -> "该条文出自《X》第N条。"
                          (only texts found once in the whole raw file, at least 20 characters,
                          and not an "本法自…施行" clause: otherwise the answer is not unique)
    law_chapter       "《X》第N条属于哪一章？"  -> "《X》第N条位于<chapter>[ <section>]。"
                          (only where the article has a chapter)

Law-level questions (one unit per law, any status; at most `meta_share` of a stage's train set,
never in test: they are about the law, not an article, and cannot be held out by article):

    law_status        "《X》的效力状态是什么？"  -> "《X》的效力状态为<status>。"
    law_department    "《X》属于哪个法律部门？"  -> "《X》属于<department>部门。"
    law_issuer        "《X》的制定机关是什么？"  -> "《X》的制定机关是<issuing body>。"
    A name shared by several versions (历史版本, 现行有效) is qualified: "<publish_date>公布的《X》".

Stages, splits and held-out articles
------------------------------------
- 1_general keeps only documents that pass a keyword relevance filter (SOAEsV2's stage 1 is
  general data relevant to finance, law, business and politics): a document is kept when its text
  contains at least `min_keyword_hits` different keywords from RELEVANCE_KEYWORDS_EN (whole words,
  any case, a plural counts as its singular) or RELEVANCE_KEYWORDS_ZH (substrings).
  `--relevance_filter false` keeps everything. On the demo data the filter keeps ~9% of the
  Wikipedia pages (country and science pages mostly fail) and ~55% of the People's Daily articles.
  `zh_share` of the examples come from People's Daily, the rest from Wikipedia (a source that
  runs short leaves its place to the other).
- 3_soe uses the articles of 企业国有资产法 and every current article that mentions 国有资产,
  国有企业, 国家出资企业 or 国有独资; its law-level questions are those of laws named …国有资产….
  2_law uses all other current articles, so each stage brings new articles. The demo data has
  only ~145 such articles, so 3_soe stays below `soe_train` (~390 train examples).
- Test splits are held out by unit: an article's (or a document's) questions all go to train or
  all to test. A stage's test set has about `test_share` of its examples, at most `max_test`.
  Only articles whose text occurs once in laws.jsonl (the law_source rule) can be held out, so no
  other record carries the same text into training; near-copies in older versions of a law are
  left to 01's n-gram decontamination.
- `eval_articles` further articles are held out for eval/ only. law_mcq.jsonl asks
  "以下条文出自哪部法律？<excerpt>" for every held-out article, with the right law and three
  distractors drawn from the laws that have usable articles (same legal department where
  possible; never a name that contains the other, like 刑法 / 刑法修正案), the answer at a seeded
  position. law_qa.jsonl holds one law question (recall, source or chapter, drawn at random) for
  each of `law_qa_size` eval-only articles.

General retention text
----------------------
Wikipedia and People's Daily are the CPT replay sources, and held-out text of a replayed source
cannot show forgetting (its perplexity improves with replay; see DESIGN.md). The only general text
in the demo that no replay set uses is the benchmark questions in <raw_dir>/bench/: each item
becomes one sentence pair, the question followed by its correct answer (PIQA: goal + right
solution), in general_ppl_bench.jsonl. It is English only: the demo has no unreplayed Chinese
general text, so Chinese retention is not measured by perplexity.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Run as `python data/make_demo_sft.py` from anywhere: make the repository's `common/` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import read_jsonl_numbered, write_jsonl  # noqa: E402
from common.errors import UserError  # noqa: E402


@dataclass
class Config:
    raw_dir: str = field(default="data/demo/raw", metadata={"help": "folder written by data/provision_demo.py"})
    out_dir: str = field(default="data/demo", metadata={"help": "writes <out_dir>/sft/... and <out_dir>/eval/..."})
    seed: int = field(default=0, metadata={"help": "seed for sampling, splits, templates and MCQ options"})
    general_train: int = field(default=2000, metadata={"help": "1_general train examples (at most)"})
    law_train: int = field(default=3000, metadata={"help": "2_law train examples (at most)"})
    soe_train: int = field(default=500, metadata={"help": "3_soe train examples (at most; the SOE pool is small)"})
    test_share: float = field(default=0.1, metadata={"help": "share of a stage's examples held out for test"})
    max_test: int = field(default=200, metadata={"help": "cap on test examples per stage (keeps CPU eval fast)"})
    relevance_filter: bool = field(default=True, metadata={
        "help": "keep only general documents relevant to law/finance/business/politics (keyword filter)"})
    min_keyword_hits: int = field(default=2, metadata={
        "help": "different relevance keywords a general document needs to be kept"})
    zh_share: float = field(default=0.5, metadata={"help": "share of 1_general examples from People's Daily"})
    meta_share: float = field(default=0.1, metadata={
        "help": "at most this share of a law stage's train set are law-level questions (status, department, issuer)"})
    max_article_chars: int = field(default=400, metadata={"help": "longer law articles are not used"})
    max_excerpt_chars: int = field(default=200, metadata={"help": "law excerpts in questions are cut to this length"})
    max_doc_chars: int = field(default=600, metadata={
        "help": "People's Daily bodies in prompts are cut to this many characters (Wikipedia: twice this)"})
    eval_articles: int = field(default=200, metadata={
        "help": "articles held out for eval/ only (law_mcq.jsonl covers these and the stages' test articles)"})
    law_qa_size: int = field(default=100, metadata={"help": "law_qa.jsonl items (at most)"})
    general_ppl_size: int = field(default=500, metadata={"help": "general_ppl_bench.jsonl texts (at most)"})

    def validate(self) -> None:
        if not 0.0 <= self.test_share < 1.0:
            raise UserError(f"test_share must be in [0, 1), got {self.test_share}")
        if not 0.0 <= self.zh_share <= 1.0:
            raise UserError(f"zh_share must be in [0, 1], got {self.zh_share}")
        if not 0.0 <= self.meta_share <= 1.0:
            raise UserError(f"meta_share must be in [0, 1], got {self.meta_share}")


# ---------------------------------------------------------------------------------------------
# Relevance keywords for 1_general (SOAEsV2 stage 1: finance, law, business, politics).

RELEVANCE_KEYWORDS_EN = [  # singular forms; a plural counts as its singular (banks -> bank)
    # law
    "law", "legal", "legislation", "legislative", "statute", "court", "judge", "judicial", "justice",
    "constitution", "constitutional", "lawyer", "crime", "criminal", "regulation", "contract", "treaty", "rights",
    # finance
    "finance", "financial", "bank", "banking", "economy", "economic", "economics", "tax", "taxation", "currency",
    "monetary", "investment", "investor", "stock", "market", "trade", "inflation", "debt", "credit", "budget",
    "fiscal", "insurance", "accounting", "asset",
    # business
    "business", "company", "corporation", "corporate", "enterprise", "industry", "industrial", "commercial",
    "commerce", "revenue", "profit", "shareholder", "privatization", "state-owned", "subsidiary",
    # politics
    "government", "political", "politics", "politician", "parliament", "congress", "election", "president",
    "minister", "policy", "democracy", "democratic", "administration", "sovereignty", "diplomatic", "reform",
]
RELEVANCE_KEYWORDS_ZH = [
    # law
    "法律", "法规", "法院", "司法", "立法", "执法", "宪法", "条例", "律师", "犯罪", "检察", "公安", "权益", "合同",
    # finance
    "经济", "金融", "银行", "财政", "税", "货币", "投资", "证券", "股份", "资本", "资产", "价格", "贷款", "保险",
    "外汇", "预算", "审计",
    # business
    "企业", "公司", "国有", "工业", "产业", "商业", "市场", "贸易", "职工", "工厂", "利润", "改革",
    # politics
    "政府", "国务院", "政策", "人民代表大会", "人大", "政协", "中共中央", "党委", "外交", "总理", "部长", "选举",
]
_EN_KEYWORDS = frozenset(RELEVANCE_KEYWORDS_EN)
_EN_WORD_RE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


@functools.lru_cache(maxsize=None)
def _en_keyword(word: str) -> str | None:
    word = word.lower()
    for stem in (word, word[:-3] + "y" if word.endswith("ies") else "", word[:-2] if word.endswith("es") else "",
                 word[:-1] if word.endswith("s") else ""):
        if stem in _EN_KEYWORDS:
            return stem
    return None


def keyword_hits(text: str) -> int:
    """How many different relevance keywords (English or Chinese) the text contains."""
    en = {_en_keyword(w) for w in _EN_WORD_RE.findall(text)} - {None}
    zh = sum(1 for k in RELEVANCE_KEYWORDS_ZH if k in text)
    return len(en) + zh


# State-owned-asset articles (3_soe).
SOE_LAW_MARK = "企业国有资产法"
SOE_TEXT_RE = re.compile("国有资产|国有企业|国家出资企业|国有独资")

CURRENT = "现行有效"
ARTICLE_NO_RE = re.compile(r"^第[零〇一二三四五六七八九十百千]+条(之[一二三四五六七八九十]+)?$")
# "本法自2009年5月1日起施行。": the same clause, up to a date, in almost every law.
EFFECTIVE_CLAUSE_RE = re.compile(r"^本(法|决定|规定|办法)自.{0,40}施行")
MIN_SOURCE_CHARS = 20
MIN_ARTICLE_CHARS = 10


# ---------------------------------------------------------------------------------------------
# Small text helpers.

_EN_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "u.s", "u.k", "no", "inc", "ltd",
    "co", "corp", "gen", "col", "lt", "sgt", "mt", "ca", "c", "approx", "fig", "vol", "op", "ft", "rev", "prof",
}
_EN_BREAK_RE = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])")


def en_sentences(text: str) -> list[str]:
    """Split English prose into sentences; a period after an abbreviation or an initial is no break."""
    out, start = [], 0
    for m in _EN_BREAK_RE.finditer(text):
        before = text[start:m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if m.group(0)[0] == "." and (last in _EN_ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


_ZH_SENTENCE_RE = re.compile(r"[^。！？]*[。！？][”’」』）)]*")


def zh_first_sentence(text: str) -> str:
    m = _ZH_SENTENCE_RE.match(text.strip())
    return m.group(0).strip() if m else ""


def cut_zh(text: str, limit: int) -> str:
    """At most `limit` characters, ending at a sentence or clause end (。；) when one is in reach."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind("。"), head.rfind("；"), head.rfind("！"), head.rfind("？"))
    return head[:end + 1] if end >= limit // 3 else head + "……"


def cut_paragraphs(paragraphs: list[str], limit: int) -> str:
    """Leading paragraphs up to `limit` characters (the first one is cut at a sentence if it is longer)."""
    kept, size = [], 0
    for p in paragraphs:
        if kept and size + len(p) + 1 > limit:
            break
        kept.append(p if kept else cut_zh(p, limit))
        size += len(p) + 1
    return "\n".join(kept)


def example(ex_id: str, template: str, source_id: str, user: str, assistant: str) -> dict:
    return {
        "id": ex_id,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "template": template,
        "source_id": source_id,
    }


def seeded_rng(seed: int, *salt: str) -> random.Random:
    """An RNG per purpose, so that changing one size never reshuffles an unrelated choice."""
    digest = hashlib.sha256(":".join([str(seed), *salt]).encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


# ---------------------------------------------------------------------------------------------
# Reading the raw files.


def read_raw(path: Path, required: tuple[str, ...]) -> list[dict]:
    """A JSONL file of provision_demo.py; any bad line stops with `file:line: reason`."""
    records = []
    for n, rec in read_jsonl_numbered(path):
        missing = [k for k in required if not isinstance(rec.get(k), str)]
        if missing:
            raise UserError(f"{path}:{n}: missing field '{missing[0]}' (fields: {', '.join(rec)})")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# General instructions (1_general).


def wiki_examples(rec: dict, max_chars: int) -> list[dict]:
    """Every Wikipedia template that applies to one record."""
    title, text, rid = rec["title"].strip(), rec["text"].strip(), rec["id"]
    sentences = en_sentences(text)
    if not title or not sentences:
        return []
    out = []
    ask = "Who is" if rec.get("topic") == "People" else "What is"
    out.append(example(f"{rid}:what_is", "wiki_what_is", rid, f"{ask} {title}?", sentences[0]))
    brief, k = sentences[0], 1
    while k < len(sentences) and len(brief) + 1 + len(sentences[k]) <= 400:
        brief, k = f"{brief} {sentences[k]}", k + 1
    if k >= 2:
        out.append(example(f"{rid}:describe", "wiki_describe", rid, f"Describe {title} briefly.", brief))
    description = (rec.get("description") or "").strip()
    if description:
        answer = description[0].upper() + description[1:]
        answer = answer if answer.endswith(".") else answer + "."
        out.append(example(f"{rid}:short", "wiki_short", rid, f"In a few words, what is {title}?", answer))
    if len(sentences) >= 3 and len(text) <= max_chars:
        out.append(example(f"{rid}:summarize", "wiki_summarize", rid,
                           f"Summarize the following paragraph in one sentence.\n\n{text}", sentences[0]))
    return out


_PHOTO_NOTE_RE = re.compile(r"[（(](附?图片?[^）)]{0,8}|传真照片)[）)]$")
_DATELINE_RE = re.compile(
    r"^据?(?:本报|新华社|中新社)[^，。\s]{0,12}?\s*([０-９0-9一二三四五六七八九十〇]{1,3}月[０-９0-9一二三四五六七八九十〇]{1,3}日)(?:电|讯)")
# "本报北京１月１５日讯记者杨明方、向兵报道：", "据新华社伦敦１月８日电（记者王诚）": not part of a summary.
_BYLINE_RE = re.compile(r"^据?(?:本报|新华社|中新社)[^，。：]{0,20}?(?:电|讯)\s*(?:[（(][^）)]{0,30}[）)])?\s*"
                        r"(?:(?:本报)?记者[^，。：]{0,20}?报道[：:])?\s*")


def pd_examples(rec: dict, max_chars: int) -> list[dict]:
    """Every People's Daily template that applies to one record."""
    rid = rec["id"]
    lines = [line.strip() for line in rec["text"].split("\n") if line.strip()]
    if not lines:
        return []
    headline = ""
    first = _PHOTO_NOTE_RE.sub("", lines[0]).strip()
    if 4 <= len(first) <= 40 and not re.search(r"[。！？；，：]", first) and len(lines) > 1:
        headline, lines = first, lines[1:]
    # The lead is the first real paragraph: not a photo caption "（…摄）", not a byline.
    lead_paragraph = next((p for p in lines if len(p) >= 30 and "。" in p and not p.startswith(("（", "("))), "")
    body = cut_paragraphs(lines, max_chars)
    if len(body) < 50:
        return []
    out = []
    lead = zh_first_sentence(lead_paragraph)
    summary = _BYLINE_RE.sub("", lead)
    if 15 <= len(summary) <= 150 and lead in body:
        out.append(example(f"{rid}:summary", "pd_summary", rid, f"请概括这篇报道的主要内容。\n\n{body}", summary))
    if headline:
        out.append(example(f"{rid}:headline", "pd_headline", rid, f"请为下面这篇报道拟一个标题。\n\n{body}", headline))
    m = _DATELINE_RE.match(lead_paragraph)
    if m and lead_paragraph[:40] in body:
        out.append(example(f"{rid}:dateline", "pd_dateline", rid, f"这篇报道是哪一天发出的？\n\n{body}",
                           f"这篇报道于{m.group(1)}发出。"))
    return out


def split_units(units: list[tuple[str, list[dict]]], n_train: int, n_test: int, can_hold_out=None,
                exclude: frozenset = frozenset()) -> tuple[list[dict], list[dict], list[str]]:
    """Fill test, then train, unit by unit (a unit's examples never straddle the two).

    `units` is already in a seeded random order. Returns (train, test, ids of the test units).
    """
    train, test, test_ids = [], [], []
    rest = []
    for uid, exs in units:
        if uid in exclude or not exs:
            continue
        if len(test) < n_test and (can_hold_out is None or can_hold_out(uid)):
            test.extend(exs)
            test_ids.append(uid)
        else:
            rest.append(exs)
    for exs in rest:
        if len(train) >= n_train:
            break
        train.extend(exs)
    return train[:n_train], test[:n_test], test_ids


def held_out_size(n_train: int, units: list[tuple[str, list[dict]]], cfg: Config) -> int:
    """About `test_share` of the stage (of what it will use, or of the pool if that is smaller), capped."""
    available = sum(len(exs) for _, exs in units)
    return min(cfg.max_test, round(n_train * cfg.test_share / (1 - cfg.test_share)),
               round(available * cfg.test_share))


def build_general(wiki: list[dict], pd: list[dict], cfg: Config) -> tuple[list[dict], list[dict], dict]:
    def doc_text(r: dict) -> str:
        return " ".join(str(r.get(k) or "") for k in ("title", "description", "text"))

    sources = {"wiki_en": (wiki, wiki_examples, 2 * cfg.max_doc_chars),
               "peoples_daily": (pd, pd_examples, cfg.max_doc_chars)}
    units, stats = {}, {}
    for name, (records, make, limit) in sources.items():
        kept = [r for r in records if keyword_hits(doc_text(r)) >= cfg.min_keyword_hits] \
            if cfg.relevance_filter else records
        rng = seeded_rng(cfg.seed, "general", name)
        units[name] = []
        for rec in sorted(kept, key=lambda r: r["id"]):
            options = make(rec, limit)
            if options:
                units[name].append((rec["id"], [rng.choice(options)]))
        rng.shuffle(units[name])
        stats[name] = {"read": len(records), "kept_relevant": len(kept), "usable": len(units[name])}

    # Train and test are shared between the sources by zh_share; a source that runs short leaves
    # its place to the other.
    zh_share = cfg.zh_share if units["wiki_en"] and units["peoples_daily"] else (1.0 if units["peoples_daily"] else 0.0)
    cap = min(cfg.max_test, round(cfg.general_train * cfg.test_share / (1 - cfg.test_share)))
    n_test = {"peoples_daily": round(cap * zh_share)}
    n_test["wiki_en"] = cap - n_test["peoples_daily"]
    n_test = {name: min(n, round(len(units[name]) * cfg.test_share)) for name, n in n_test.items()}
    room = {name: len(units[name]) - n_test[name] for name in units}
    zh_train = min(round(cfg.general_train * zh_share), room["peoples_daily"])
    en_train = min(cfg.general_train - zh_train, room["wiki_en"])
    zh_train = min(cfg.general_train - en_train, room["peoples_daily"])
    train, test = [], []
    for name, n_train in (("wiki_en", en_train), ("peoples_daily", zh_train)):
        tr, te, _ = split_units(units[name], n_train, n_test[name])
        train += tr
        test += te
        stats[name].update(train=len(tr), test=len(te))
    return train, test, stats


# ---------------------------------------------------------------------------------------------
# Law QA (2_law, 3_soe, eval).


def law_examples(art: dict, unique_text: bool, max_excerpt: int) -> list[dict]:
    """Every article template that applies to one current article."""
    law, no, text, aid = art["law_name"], art["article_no"], art["text"].strip(), art["id"]
    out = [example(f"{aid}:recall", "law_recall", aid, f"《{law}》{no}规定了什么？", text)]
    if unique_text:
        out.append(example(f"{aid}:source", "law_source", aid,
                           f"下面这段条文出自哪部法律的哪一条？\n{cut_zh(text, max_excerpt)}", f"该条文出自《{law}》{no}。"))
    chapter = (art.get("chapter") or "").strip()
    if chapter:
        where = f"{chapter} {art['section'].strip()}" if (art.get("section") or "").strip() else chapter
        out.append(example(f"{aid}:chapter", "law_chapter", aid, f"《{law}》{no}属于哪一章？", f"《{law}》{no}位于{where}。"))
    return out


def law_meta_units(laws: list[dict]) -> tuple[list[tuple[str, list[dict]]], dict[str, str]]:
    """Law-level questions, one unit per law version (any status), and each unit's law name."""
    by_law: dict[str, dict] = {}
    for art in laws:
        by_law.setdefault(art.get("law_id") or art["law_name"], art)
    versions = Counter(a["law_name"] for a in by_law.values())
    units = []
    for law_id in sorted(by_law):
        art = by_law[law_id]
        name = f"《{art['law_name']}》"
        if versions[art["law_name"]] > 1:
            name = f"{art.get('publish_date') or '某日'}公布的{name}"
        exs, uid = [], f"lawmeta-{law_id}"
        if art.get("status"):
            exs.append(example(f"{uid}:status", "law_status", uid, f"{name}的效力状态是什么？",
                               f"{name}的效力状态为{art['status']}。"))
        if art.get("department"):
            exs.append(example(f"{uid}:department", "law_department", uid, f"{name}属于哪个法律部门？",
                               f"{name}属于{art['department']}部门。"))
        if art.get("issuing_body"):
            exs.append(example(f"{uid}:issuer", "law_issuer", uid, f"{name}的制定机关是什么？",
                               f"{name}的制定机关是{art['issuing_body']}。"))
        if exs:
            units.append((uid, exs, art["law_name"]))
    return [(uid, exs) for uid, exs, _ in units], {uid: name for uid, _, name in units}


def distinct_laws(a: str, b: str) -> bool:
    """Two law names an MCQ can offer side by side (刑法 vs 刑法修正案（九） cannot)."""
    short_a, short_b = a.replace("中华人民共和国", ""), b.replace("中华人民共和国", "")
    return short_a not in short_b and short_b not in short_a


def make_mcq(art: dict, names_by_department: dict[str, list[str]], all_names: list[str], rng: random.Random,
             max_excerpt: int) -> dict:
    right = art["law_name"]
    same = [n for n in names_by_department.get(art.get("department") or "", []) if distinct_laws(n, right)]
    others = [n for n in all_names if distinct_laws(n, right) and n not in same]
    if len(same) + len(others) < 3:
        raise UserError(f"law_mcq needs at least 4 different laws with usable articles, found {len(all_names)}")
    distractors = rng.sample(same, min(3, len(same)))
    distractors += rng.sample(others, 3 - len(distractors))
    rng.shuffle(distractors)
    pos = rng.randrange(4)
    options = distractors[:pos] + [right] + distractors[pos:]
    item = {"id": f"{art['id']}:mcq", "question": f"以下条文出自哪部法律？\n{cut_zh(art['text'], max_excerpt)}"}
    item.update({letter: f"《{name}》" for letter, name in zip("ABCD", options)})
    item["answer"] = "ABCD"[pos]
    item["source_id"] = art["id"]
    return item


def build_law(laws: list[dict], cfg: Config) -> dict:
    text_count = Counter(a["text"].strip() for a in laws)
    current = [a for a in laws
               if a.get("status") == CURRENT and ARTICLE_NO_RE.match(a.get("article_no") or "")
               and MIN_ARTICLE_CHARS <= len(a["text"].strip()) <= cfg.max_article_chars]
    current.sort(key=lambda a: a["id"])
    by_id = {a["id"]: a for a in current}

    def unique(a: dict) -> bool:
        text = a["text"].strip()
        return text_count[text] == 1 and len(text) >= MIN_SOURCE_CHARS and not EFFECTIVE_CLAUSE_RE.match(text)

    def is_soe(a: dict) -> bool:
        return SOE_LAW_MARK in a["law_name"] or bool(SOE_TEXT_RE.search(a["text"]))

    def units_of(articles: list[dict], salt: str) -> list[tuple[str, list[dict]]]:
        units = [(a["id"], law_examples(a, unique(a), cfg.max_excerpt_chars)) for a in articles]
        seeded_rng(cfg.seed, salt).shuffle(units)
        return units

    def can_hold_out(aid: str) -> bool:
        return unique(by_id[aid])

    soe_units = units_of([a for a in current if is_soe(a)], "soe")
    law_units = units_of([a for a in current if not is_soe(a)], "law")
    meta_units, meta_law = law_meta_units(laws)
    seeded_rng(cfg.seed, "meta").shuffle(meta_units)

    # Held-out articles are chosen first, for every stage and for eval, so that no train split of
    # any stage contains one.
    _, soe_test, soe_ids = split_units(soe_units, 0, held_out_size(cfg.soe_train, soe_units, cfg), can_hold_out)
    _, law_test, law_ids = split_units(law_units, 0, held_out_size(cfg.law_train, law_units, cfg), can_hold_out)
    taken = frozenset(soe_ids) | frozenset(law_ids)
    eval_ids = [uid for uid, _ in units_of(current, "eval") if uid not in taken and can_hold_out(uid)]
    eval_ids = eval_ids[:cfg.eval_articles]
    heldout = taken | frozenset(eval_ids)

    def train_for(units, meta, n_train):
        meta_train, _, _ = split_units(meta, int(n_train * cfg.meta_share), 0)
        train, _, _ = split_units(units, n_train - len(meta_train), 0, exclude=heldout)
        return train + meta_train

    soe_meta = [(uid, exs) for uid, exs in meta_units if "国有资产" in meta_law[uid]]
    soe_train = train_for(soe_units, soe_meta, cfg.soe_train)
    law_train = train_for(law_units, meta_units, cfg.law_train)

    # eval/: MCQ over every held-out article, one generation question per eval-only article.
    # Distractors are laws that themselves have usable articles (not amendments or decisions).
    names = sorted({a["law_name"] for a in current})
    by_department: dict[str, list[str]] = defaultdict(list)
    for name, dept in sorted({(a["law_name"], a.get("department") or "") for a in current}):
        by_department[dept].append(name)
    mcq_rng = seeded_rng(cfg.seed, "mcq")
    mcq_ids = soe_ids + law_ids + eval_ids
    mcq = [make_mcq(by_id[aid], by_department, names, mcq_rng, cfg.max_excerpt_chars) for aid in mcq_ids]
    qa_rng = seeded_rng(cfg.seed, "law_qa")
    law_qa = [qa_rng.choice(law_examples(by_id[aid], True, cfg.max_excerpt_chars))
              for aid in eval_ids[:cfg.law_qa_size]]

    used_by: dict[str, list[str]] = defaultdict(list)
    for aid in soe_ids:
        used_by[aid].append("3_soe/test")
    for aid in law_ids:
        used_by[aid].append("2_law/test")
    for aid in mcq_ids:
        used_by[aid].append("eval/law_mcq")
    for ex in law_qa:
        used_by[ex["source_id"]].append("eval/law_qa")
    heldout_rows = [{"id": aid, "law_name": by_id[aid]["law_name"], "article_no": by_id[aid]["article_no"],
                     "text": by_id[aid]["text"], "used_by": sorted(set(used_by[aid]))} for aid in sorted(heldout)]
    stats = {"articles": len(laws), "current_usable": len(current), "soe_articles": len(soe_units),
             "heldout_articles": len(heldout)}
    return {"2_law": (law_train, law_test), "3_soe": (soe_train, soe_test), "heldout": heldout_rows,
            "mcq": mcq, "law_qa": law_qa, "stats": stats}


# ---------------------------------------------------------------------------------------------
# General-retention text from the benchmarks (not a replay source).


def bench_texts(bench_dir: Path, cfg: Config) -> list[dict]:
    """Each benchmark item as one text: its question followed by its correct answer."""
    rows = []
    for path in sorted(bench_dir.glob("*.jsonl")):
        for n, rec in enumerate(read_raw(path, ("question", "answer")), 1):
            answer = rec.get(rec["answer"].strip())
            if not isinstance(answer, str):
                raise UserError(f"{path}: item {n}: answer {rec['answer']!r} names no option "
                                f"(fields: {', '.join(rec)})")
            text = f"{rec['question'].strip()} {answer.strip()}".strip()
            if len(text) >= 20:  # PIQA has goals like "dresser"
                rows.append({"id": f"{path.stem}-{n}", "text": text, "source": path.stem})
    seeded_rng(cfg.seed, "general_ppl").shuffle(rows)
    return rows[:cfg.general_ppl_size]


# ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    started = time.time()
    raw, out = Path(cfg.raw_dir), Path(cfg.out_dir)
    if not (raw / "laws.jsonl").is_file():
        raise UserError(f"{raw / 'laws.jsonl'}: no such file; run data/provision_demo.py first")
    laws = read_raw(raw / "laws.jsonl", ("id", "text", "law_name", "article_no"))
    wiki = read_raw(raw / "wiki_en.jsonl", ("id", "text", "title")) if (raw / "wiki_en.jsonl").is_file() else []
    pd = read_raw(raw / "peoples_daily.jsonl", ("id", "text")) if (raw / "peoples_daily.jsonl").is_file() else []
    if not wiki and not pd:
        raise UserError(f"{raw}: neither wiki_en.jsonl nor peoples_daily.jsonl has records; 1_general needs one")
    if not laws:
        raise UserError(f"{raw / 'laws.jsonl'}: no records")

    general_train, general_test, general_stats = build_general(wiki, pd, cfg)
    law = build_law(laws, cfg)
    stages = {"1_general": (general_train, general_test), "2_law": law["2_law"], "3_soe": law["3_soe"]}

    counts: dict[str, int] = {}
    for stage, (train, test) in stages.items():
        for split, rows in (("train", train), ("test", test)):
            rows = sorted(rows, key=lambda ex: ex["id"])
            seeded_rng(cfg.seed, stage, split).shuffle(rows)
            counts[f"sft/{stage}/{split}"] = write_jsonl(out / "sft" / stage / f"{split}.jsonl", rows)
    counts["sft/heldout_articles"] = write_jsonl(out / "sft" / "heldout_articles.jsonl", law["heldout"])
    counts["eval/law_mcq"] = write_jsonl(out / "eval" / "law_mcq.jsonl", law["mcq"])
    counts["eval/law_qa"] = write_jsonl(out / "eval" / "law_qa.jsonl", law["law_qa"])
    ppl_path = out / "eval" / "general_ppl_bench.jsonl"
    ppl = bench_texts(raw / "bench", cfg) if (raw / "bench").is_dir() else []
    if ppl:
        counts["eval/general_ppl_bench"] = write_jsonl(ppl_path, ppl)
    elif ppl_path.exists():
        ppl_path.unlink()  # a file from an earlier run with benchmarks would no longer match the raw data

    templates = {stage: dict(sorted(Counter(ex["template"] for ex in train + test).items()))
                 for stage, (train, test) in stages.items()}
    result = {"counts": counts, "general": general_stats, "law": law["stats"], "templates": templates,
              "seconds": round(time.time() - started, 2)}

    print(f"{'file':<28} {'records':>8}")
    for name, n in counts.items():
        print(f"{name:<28} {n:>8}")
    for name, s in general_stats.items():
        print(f"{name}: {s['read']} read, {s['kept_relevant']} kept by the relevance filter"
              f"{'' if cfg.relevance_filter else ' (off)'}, {s['usable']} usable, "
              f"{s['train']} train / {s['test']} test")
    s = law["stats"]
    print(f"laws: {s['articles']} articles, {s['current_usable']} current and usable, "
          f"{s['soe_articles']} state-owned-asset, {s['heldout_articles']} held out")
    for stage, t in templates.items():
        print(f"{stage} templates: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    print(f"wrote {out / 'sft'} and {out / 'eval'} in {result['seconds']:.1f}s")
    return result


if __name__ == "__main__":
    from common.config import run_main

    run_main(main, Config)
