"""Stage 01 (01_build_corpus.py): each filter on both sides in Chinese and English, PII, near-duplicates,
decontamination, the mixture share, determinism, bad input, the files a run writes, and the datatrove engine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from common.config import make_config
from common.errors import UserError
from common.run import load_script

ROOT = Path(__file__).resolve().parents[1]


bc = load_script(ROOT / "01_build_corpus.py", "build_corpus")


def cfg_of(**kw):
    kw.setdefault("domain", ["unused.jsonl"])
    kw.setdefault("general", ["unused.jsonl"])
    return bc.Config(**kw)


def run_steps(text: str, steps=("normalize", "language", "quality"), **kw) -> str | None:
    """Drop reason ('step:reason') or None after running `steps` on one document."""
    cfg = cfg_of(**kw)
    doc = {"idx": 0, "id": "d", "text": text}
    times = [0] * len(steps)
    return bc.process_doc(doc, list(steps), cfg, {}, times) or None


# --- synthetic text ---------------------------------------------------------------------------------

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_HAN = "国家经济发展社会人民企业管理制度法律监督资产财政金融市场政府部门组织机构权利义务责任规定条件程序标准"


ZH_WORDS = ("国家 经济 发展 社会 人民 企业 管理 制度 法律 监督 资产 财政 金融 市场 政府 部门 组织 机构 权利 义务 "
            "责任 规定 条件 程序 标准 保护 促进 加强 建立 健全 实施 依法 审计 评估 核实 价值 报告 考核 职责 出资 "
            "改制 风险 控制 内部 外部 行政 法规 地方 中央 公司 股东 董事 会议 决定 合同 协议 财产 收益 投资 项目 "
            "工程 技术 创新 教育 文化 卫生 环境 安全 生产 质量 信息 服务").split()


def en_vocab(rng: random.Random, n: int = 600) -> list[str]:
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)})
    return words + ["the", "of", "and", "to", "with", "that"] * 15  # stop words, weighted as in real text


def zh_vocab(rng: random.Random, n: int = 600) -> list[str]:
    return sorted({rng.choice(_HAN) + rng.choice(_HAN) for _ in range(n)}) + ["的", "和", "在", "对"] * 20


def make_doc(rng: random.Random, vocab: list[str], n_words: int, lang: str) -> str:
    words = [rng.choice(vocab) for _ in range(n_words)]
    if lang == "en":
        sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
        return " ".join(sentences)
    return "。".join("，".join("".join(words[j:j + 4]) for j in range(i, min(i + 12, n_words), 4))
                    for i in range(0, n_words, 12)) + "。"


EN_GOOD = ("The committee met on Tuesday to review the annual budget of the city library. Members agreed that the "
           "reading rooms need new lighting and that the children's section should open earlier on weekends. The "
           "chair asked the treasurer to prepare two options with different costs, and the board will vote on them "
           "at the next meeting in March. Several residents spoke in favour of longer opening hours during exams.")
ZH_GOOD = ("国家出资企业应当建立健全内部监督管理和风险控制制度，依照法律、行政法规的规定，加强对国有资产的保护。"
           "履行出资人职责的机构对本级人民政府负责，向本级人民政府报告履行出资人职责的情况，并接受本级人民政府的监督和考核。"
           "企业改制应当按照规定的程序进行，清产核资，财务审计，资产评估，准确界定和核实资产，客观公正地确定资产的价值。")


# --- 1. normalize ------------------------------------------------------------------------------------

def test_normalize_width_punctuation_html_controls_whitespace():
    cfg = cfg_of()
    text = "ＡＢＣ１２３　全角，标点：保留！（是）\u200b&amp;&nbsp;x <p>para</p><b>bold</b>\r\n\r\n\r\n\x07end  a < b <EMAIL>"
    assert bc.normalize_text(text, cfg) == "ABC123 全角，标点：保留！（是）& x\npara\nbold\n\nend a < b <EMAIL>"
    html_doc = '<script>var a=1;</script><div class="x">Hello&#20013;</div><!-- c -->World\t\ttab'
    assert bc.normalize_text(html_doc, cfg) == "Hello中\nWorld tab"
    assert bc.normalize_text("ＡＢＣ，", cfg_of(keep_cjk_punctuation=False)) == "ABC,"
    assert run_steps(" \u200b <br> ", steps=("normalize",)) == "normalize:empty"


# --- 2. language -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, lang", [
    (ZH_GOOD, "zh"),
    (EN_GOOD, "en"),
    ("我们使用 Python 和 PyTorch 训练模型，数据来自公开的语料库。", "zh"),  # Chinese with some English words
    ("The word 国家 means state in Chinese, and the word 经济 means economy.", "en"),
    ("これは日本語の文章です。ひらがなとカタカナが多いです。", "other"),
    ("Это предложение написано на русском языке.", "other"),
    ("123 456 789 %%% ---", "other"),
])
def test_script_heuristic(text, lang):
    assert bc.detect_lang(text, cfg_of()) == lang


def test_language_step_drops_other_languages():
    assert run_steps("Это предложение написано на русском языке.", steps=("normalize", "language")) == "language:lang_other"
    assert run_steps(EN_GOOD, steps=("normalize", "language"), languages=["zh"]) == "language:lang_en"
    assert run_steps(EN_GOOD, steps=("normalize", "language")) is None


def test_rjieba_matches_jieba_reference():
    text = ZH_GOOD + "第一条 为了规范公司的组织和行为，保护公司、股东、职工和债权人的合法权益，制定本法。"
    assert bc.segment(text, "rjieba") == bc.segment(text, "jieba")


# --- 3. quality: each rule with a passing and a failing document, in Chinese and English -------------

def test_good_documents_pass_quality_and_repetition():
    for text in (EN_GOOD, ZH_GOOD):
        assert run_steps(text, steps=("normalize", "language", "quality", "repetition"), min_words_en=30,
                         min_words_zh=30) is None


def test_gopher_english_defaults_would_drop_chinese():
    # Why Chinese has its own bounds: jieba words average ~2 characters, below Gopher's English minimum of 3.
    assert run_steps(ZH_GOOD, min_words_zh=30, min_mean_word_len_zh=3.0) == "quality:short_words"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_word_count(lang):
    good = EN_GOOD if lang == "en" else ZH_GOOD
    assert run_steps(good, min_words_en=30, min_words_zh=30) is None
    assert run_steps(good, min_words_en=500, min_words_zh=500) == "quality:too_few_words"
    assert run_steps(good, min_words_en=30, min_words_zh=30, max_words_en=40, max_words_zh=40) == "quality:too_many_words"


def test_mean_word_length():
    rng = random.Random(0)
    short_en = " ".join(rng.choice(["a", "an", "to", "of", "is", "be", "the", "and", "it", "we"]) for _ in range(80))
    long_en = " ".join(rng.choice(["internationalization", "telecommunications", "counterrevolutionaries",
                                   "the", "of"]) for _ in range(80))
    assert run_steps(short_en) == "quality:short_words"
    assert run_steps(long_en) == "quality:long_words"
    # Chinese: single-character tokens (separated by punctuation) vs very long dictionary words
    short_zh = "，".join(rng.choice("鑫淼犇骉焱垚猋") for _ in range(80)) + "的"
    long_zh = "，".join(["中华人民共和国", "全国人民代表大会常务委员会", "的"] * 30)
    assert run_steps(short_zh) == "quality:short_words"
    assert run_steps(long_zh) == "quality:long_words"
    assert run_steps(ZH_GOOD, min_words_zh=30) is None


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_symbols_bullets_ellipsis_lines(lang):
    good = EN_GOOD if lang == "en" else ZH_GOOD
    kw = {"min_words_en": 30, "min_words_zh": 30}
    assert run_steps(good, **kw) is None
    tags = " ".join(["#tag"] * 20)
    assert run_steps(good + " " + tags, **kw) == "quality:symbols"
    sentences = [s for s in (good.split(". ") if lang == "en" else good.split("。")) if s]
    bullets = "\n".join(("- " if lang == "en" else "• ") + s for s in sentences)
    assert run_steps(bullets, **kw) == "quality:bullet_lines"
    assert run_steps("\n".join(s + " of the" for s in sentences), **kw) is None
    ellipsis = "\n".join(s + ("..." if lang == "en" else "……") for s in sentences)
    assert run_steps(ellipsis, max_symbol_word_ratio=1.0, **kw) == "quality:ellipsis_lines"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_alpha_share_and_stop_words(lang):
    rng = random.Random(1)
    numbers = " ".join(str(rng.randint(10, 99999)) for _ in range(120))
    if lang == "en":
        assert run_steps(EN_GOOD + " " + numbers, min_words_en=30) == "quality:non_alpha"
        no_stop = " ".join(rng.choice(["apple", "river", "stone", "cloud", "green", "table", "music", "light"])
                           for _ in range(80))
        assert run_steps(no_stop) == "quality:few_stop_words"
    else:
        assert run_steps(ZH_GOOD + "，".join(numbers.split()), min_words_zh=30) == "quality:non_alpha"
        no_stop = "，".join(rng.choice(["苹果", "河流", "石头", "云彩", "绿色", "桌子", "音乐", "灯光"]) for _ in range(80))
        assert run_steps(no_stop) == "quality:few_stop_words"


# --- 4. repetition -----------------------------------------------------------------------------------

REP = ("normalize", "language", "repetition")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_repetition_rules(lang):
    rng = random.Random(2)
    vocab = en_vocab(rng) if lang == "en" else zh_vocab(rng)
    sep = " " if lang == "en" else ""
    base = [make_doc(rng, vocab, 12, lang) for _ in range(10)]
    assert run_steps("\n".join(base), steps=REP) is None
    assert run_steps("\n".join(base + base[:5]), steps=REP) == "repetition:dup_lines"
    assert run_steps("\n\n".join(base + base[:5]), steps=REP) == "repetition:dup_paragraphs"
    # one long line repeated as a chunk inside a line: duplicated 5..10-grams
    chunk = make_doc(rng, vocab, 40, lang)
    assert run_steps(sep.join([make_doc(rng, vocab, 60, lang), chunk, chunk]), steps=REP).startswith("repetition:dup_")
    # one pair of words over and over between distinct words: top 2-gram
    pair = "quorum ballot" if lang == "en" else "国有资产监督管理"  # words the segmenter keeps whole
    text = sep.join(f"{rng.choice(vocab)}{sep}{pair}" for _ in range(40))
    assert run_steps(text, steps=REP) == "repetition:top_2gram"


def test_ngram_helpers():
    words = "a b c a b c x y".split()
    assert bc.top_ngram_chars(words, 2) == 4  # "a b" twice, 2 characters each time
    assert bc.top_ngram_chars("a b c d".split(), 2) == 0  # nothing repeats
    assert bc.dup_ngram_chars(words, 3) == 6  # both occurrences of "a b c"


# --- 5. PII -----------------------------------------------------------------------------------------

def id_number(prefix17: str) -> str:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return prefix17 + "10X98765432"[sum(int(d) * w for d, w in zip(prefix17, weights)) % 11]


def luhn_complete(prefix: str) -> str:
    for last in "0123456789":
        digits = prefix + last
        total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                    for i, d in enumerate(reversed(digits)))
        if total % 10 == 0:
            return digits
    raise AssertionError


def redact(text):
    return bc.redact_pii(text, bc.PII_TYPES)


def test_pii_id_numbers_checksum():
    valid = id_number("11010519491231002")
    wrong = valid[:17] + ("0" if valid[17] != "0" else "1")
    assert bc.id_number_valid(valid) and not bc.id_number_valid(wrong)
    assert redact(f"身份证号{valid}。") == ("身份证号<ID_NUMBER>。", {"ID_NUMBER": 1})
    assert redact(f"编号{wrong}。")[0] == f"编号{wrong}。"  # wrong check digit: left alone, not a card either
    x_id = next(id_number(f"44030119900101{i:03d}") for i in range(1000)
                if id_number(f"44030119900101{i:03d}").endswith("X"))
    assert redact(f"ID {x_id.lower()}")[0] == "ID <ID_NUMBER>"


def test_pii_bank_cards_luhn():
    card = luhn_complete("622202123456789")  # 16 digits
    bad = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert redact(f"卡号{card}")[0] == "卡号<BANK_CARD>"
    assert redact(f"card {card[:4]} {card[4:8]} {card[8:12]} {card[12:]} ok")[0] == "card <BANK_CARD> ok"
    assert redact(f"卡号{bad}")[0] == f"卡号{bad}"
    assert redact(f"合计64281.{card}")[0] == f"合计64281.{card}"  # digits after a decimal point


def test_pii_email_phone_ip_and_non_pii_numbers():
    text, counts = redact("请联系 zhang.san+law@example.com.cn 或 13812345678、+86 139-1234-5678，"
                          "电话 010-62751234，(0755)12345678，London +44 20 7946 0958。服务器 192.168.10.254 与 2001:db8::ff00:42:8329。")
    assert counts == {"EMAIL": 1, "PHONE": 5, "IP": 2}
    assert "<EMAIL>" in text and "example.com" not in text and "192.168" not in text and "2001:db8" not in text
    plain = "1998年1月1日，增长12.5%，共1234567元，会议于12:30:45开始，版本 1.2.3，第十三届。"
    assert redact(plain) == (plain, {})
    assert redact("not an ip 999.1.1.1 nor 10.0.0")[1] == {}


def test_pii_step_counts_and_switch():
    cfg = cfg_of(pii_types=["email"])
    doc = {"text": "mail a@b.org or 13812345678"}
    bc.step_pii(doc, cfg, {})
    assert doc["text"] == "mail <EMAIL> or 13812345678" and doc["pii"] == {"EMAIL": 1}


# --- 6-8. decontamination and deduplication ----------------------------------------------------------

def test_decontamination_ngrams():
    cfg = cfg_of()
    eval_text = "Which of these is the best way to keep a cast iron pan from rusting after washing it in water"
    grams, firsts = bc.eval_ngrams([eval_text, "too short to index"], cfg)
    ctx = {"eval_grams": grams, "eval_firsts": firsts, "exclude_ids": {"held-1"}}
    contaminated = {"id": "a", "text": "Forum post. " + eval_text.upper() + " Answer: dry it.", "lang": "en"}
    near_miss = {"id": "b", "text": " ".join(eval_text.split()[:12]) + " and something else entirely", "lang": "en"}
    assert bc.step_decontam(contaminated, cfg, ctx) == "eval_overlap"  # case and punctuation do not matter
    assert bc.step_decontam(near_miss, cfg, ctx) is None  # 12 shared words < 13
    assert bc.step_decontam({"id": "held-1", "text": "x", "lang": "en"}, cfg, ctx) == "excluded_id"
    zh_eval = "国家出资企业应当建立健全内部监督管理和风险控制制度，依照法律、行政法规的规定，加强对国有资产的保护"
    grams, firsts = bc.eval_ngrams([zh_eval], cfg)
    doc = {"id": "c", "text": "前文。" + zh_eval + "。后文", "lang": "zh"}
    assert bc.step_decontam(doc, cfg, {"eval_grams": grams, "eval_firsts": firsts}) == "eval_overlap"
    assert bc.step_decontam({"id": "d", "text": ZH_GOOD[60:], "lang": "zh"}, cfg,
                            {"eval_grams": grams, "eval_firsts": firsts}) is None


def _signed(texts, cfg):
    out = []
    for i, text in enumerate(texts):
        doc = {"idx": i, "text": text, "lang": bc.detect_lang(text, cfg)}
        bc.step_fingerprint(doc, cfg, {})
        out.append({"idx": i, "sig": doc["sig"]})
    return out


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_near_duplicate_recall_and_no_false_merges(lang):
    cfg = cfg_of()  # default threshold, n-gram size and permutations
    rng = random.Random(3)
    vocab = en_vocab(rng) if lang == "en" else ZH_WORDS  # real words: jieba keeps an edit to one or two tokens
    base_words = [[rng.choice(vocab) for _ in range(150)] for _ in range(50)]
    copies = []
    for words in base_words:
        words = list(words)
        for _ in range(3):  # a few word edits per copy
            words[rng.randrange(len(words))] = rng.choice(vocab)
        copies.append(words)
    join = " ".join if lang == "en" else "".join
    texts = [join(w) for w in base_words] + [join(w) for w in copies]
    dropped = bc.near_dedup(_signed(texts, cfg), cfg)
    assert not dropped & set(range(50)), "a distinct document was merged"
    recall = len(dropped & set(range(50, 100))) / 50
    assert recall >= 0.9, recall


def test_minhash_uses_seed():
    text = EN_GOOD
    a = _signed([text], cfg_of(seed=0))[0]["sig"]
    assert a == _signed([text], cfg_of(seed=0))[0]["sig"] and a != _signed([text], cfg_of(seed=1))[0]["sig"]


# --- mixture --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_sample_chars_hits_target(target):
    rng = random.Random(4)
    pool = [{"text": "x" * rng.randint(50, 800)} for _ in range(400)]
    total = sum(len(d["text"]) for d in pool)
    picks, passes = bc.sample_chars(pool, target * total, random.Random(0))
    assert abs(sum(len(d["text"]) for d, _ in picks) / (target * total) - 1) < 0.01
    picks, passes = bc.sample_chars(pool, 2.5 * total, random.Random(0))  # upsampling: repeated passes
    assert passes == 2.5 and {c for _, c in picks} == {0, 1, 2}


# --- whole-stage runs ---------------------------------------------------------------------------------

def write_jsonl(path: Path, records, bad_line: str | None = None):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if bad_line is not None:
        lines.insert(3, bad_line)
    # surrogateescape turns a lone "\udcff" into the raw byte 0xff: undecodable input for the reader
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small domain (Chinese, 12 'laws') + general (English and Chinese) corpus with SFT and eval files."""
    d = tmp_path_factory.mktemp("raw")
    rng = random.Random(5)
    zh, en = zh_vocab(rng), en_vocab(rng)
    laws = []
    for law in range(12):
        for art in range(12):
            laws.append({"id": f"law-{law}-{art}", "text": make_doc(rng, zh, rng.randint(40, 120), "zh"),
                         "law_name": f"第{law}号法"})
    laws[5]["text"] = laws[4]["text"]  # an exact duplicate
    laws[7]["text"] = "联系人邮箱 someone@example.com，" + laws[7]["text"]
    general_en = [{"id": f"en-{i}", "text": make_doc(rng, en, rng.randint(60, 200), "en")} for i in range(150)]
    general_en[20]["text"] = ""  # an empty document: dropped by normalize (datatrove's reader would skip it)
    general_zh = [{"id": f"zh-{i}", "text": make_doc(rng, zh, rng.randint(60, 200), "zh")} for i in range(60)]
    eval_rows = [{"question": laws[10]["text"][:60], "A": "甲", "B": "乙", "answer": "A"},
                 {"question": "short", "A": "x", "B": "y", "answer": "B"}]
    general_zh[7]["text"] = general_zh[7]["text"] + "\udcff"  # written below as a byte that is not UTF-8
    sft = d / "sft_law"
    sft.mkdir()
    write_jsonl(sft / "train.jsonl", [{"question": f"问题{i}", "answer": f"答案{i}"} for i in range(8)])
    write_jsonl(sft / "test.jsonl", [{"messages": [{"role": "user", "content": "第3号法第2条规定了什么？"},
                                                   {"role": "assistant", "content": laws[38]["text"]}]}])
    write_jsonl(d / "sft_general.jsonl", [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(10)])
    return {
        "domain": write_jsonl(d / "laws.jsonl", laws, bad_line='{"id": "broken", "text": '),
        "general_en": write_jsonl(d / "wiki.jsonl", general_en),
        "general_zh": write_jsonl(d / "news.jsonl", general_zh),
        "eval": write_jsonl(d / "mcq.jsonl", eval_rows),
        "exclude": write_jsonl(d / "held.jsonl", [{"id": "law-0-0", "text": "x"}]),
        "sft_law": sft, "sft_general": d / "sft_general.jsonl", "laws": laws,
    }


def stage_cfg(corpus, out: Path, **kw):
    values = {
        "domain": [f"law={corpus['domain']}"],
        "general": [str(corpus["general_en"]), str(corpus["general_zh"])],
        "sft_stage": [f"general={corpus['sft_general']}", f"law={corpus['sft_law']}"],
        "eval": [str(corpus["eval"])], "exclude": [str(corpus["exclude"])],
        "holdout_field": "law_name", "validation_fraction": 0.1, "general_validation_fraction": 0.05,
        "min_words_zh": 20, "min_words_en": 20, "replay_ratio": 0.3, "output_dir": str(out), "plot": False,
    }
    values.update(kw)
    return make_config(bc.Config, values)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "01_corpus"
    metrics = bc.main(stage_cfg(corpus, out, plot=True))
    return out, metrics


def test_run_writes_exact_files_and_manifest(run_a):
    out, metrics = run_a
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["config.yaml", "eval/mcq.jsonl", "lengths.png", "manifest.json", "report.md",
                     "sft/1_general/test.jsonl", "sft/1_general/train.jsonl", "sft/2_law/test.jsonl",
                     "sft/2_law/train.jsonl", "stats.json", "train.jsonl", "validation_domain.jsonl",
                     "validation_general.jsonl"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "01_corpus" and manifest["status"] == "complete" and manifest["seed"] == 0
    for key in ("start_time", "end_time", "config", "inputs", "outputs", "metrics", "versions", "git_commit"):
        assert key in manifest
    assert manifest["outputs"]["train"] == "train.jsonl" and "sft_2_law_test" in manifest["outputs"]
    assert "domain:law" in manifest["inputs"] and "sha256" in manifest["inputs"]["domain:law"]
    assert manifest["metrics"]["train_docs"] == metrics["train_docs"] > 0
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_outputs_content(run_a, corpus):
    out, _ = run_a
    train = jsonl(out / "train.jsonl")
    assert set(train[0]) == {"id", "text", "source", "kind", "lang", "copy", "meta"}
    val = jsonl(out / "validation_domain.jsonl")
    ids = {r["id"] for r in train + val}
    assert "law-0-0" not in ids  # --exclude
    assert "law-0-10" not in ids  # shares a long n-gram with an eval question
    assert "law-3-2" not in ids  # its text is an SFT test answer
    assert "law-0-5" not in ids and "law-0-4" in ids  # exact duplicate: the first one is kept
    texts = [r["text"] for r in train + val if r["kind"] == "domain"]
    assert len(texts) == len(set(texts))
    assert any("<EMAIL>" in t for t in texts) and not any("someone@example.com" in t for t in texts)
    held_laws = {r["meta"]["law_name"] for r in val}
    assert held_laws and not held_laws & {r["meta"]["law_name"] for r in train if r["kind"] == "domain"}
    assert jsonl(out / "validation_general.jsonl")
    sft = jsonl(out / "sft/2_law/train.jsonl")
    assert sft[0]["messages"][0] == {"role": "user", "content": "问题0"} and "_source" not in sft[0]
    assert len(jsonl(out / "sft/1_general/test.jsonl")) == 1  # 10 records, 10% test
    stats = json.loads((out / "stats.json").read_text())
    law = stats["sources"]["law"]
    assert law["read"]["malformed"] == 1 and law["read"]["read"] == 144
    assert law["steps"]["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert law["steps"]["decontam"]["dropped"]["excluded_id"] == 1
    assert law["steps"]["decontam"]["dropped"]["eval_overlap"] >= 2
    assert law["steps"]["pii"]["redactions"] == {"EMAIL": 1}
    for step, entry in law["steps"].items():
        assert entry["in"] == entry["out"] + sum(entry["dropped"].values()), step
    assert stats["sources"]["wiki"]["steps"]["normalize"]["dropped"] == {"empty": 1}
    assert stats["sources"]["news"]["read"]["undecodable"] == 1  # replaced by U+FFFD, counted, kept
    report = (out / "report.md").read_text()
    assert "| law |" in report and "Funnel" in report and "malformed" in report.lower()
    assert "invalid JSON" in report  # the malformed line's reason


def test_mixture_share_within_two_percent(run_a):
    out, metrics = run_a
    train = jsonl(out / "train.jsonl")
    total = sum(len(r["text"]) for r in train)
    general = sum(len(r["text"]) for r in train if r["kind"] == "general")
    assert abs(general / total - 0.3) <= 0.02
    assert abs(metrics["replay_ratio_achieved"] - 0.3) <= 0.02


def test_mixture_upsamples_small_general_pool(corpus, tmp_path):
    metrics = bc.main(stage_cfg(corpus, tmp_path / "o", replay_ratio=0.9, sft_stage=[], eval=[], exclude=[]))
    assert abs(metrics["replay_ratio_achieved"] - 0.9) <= 0.02
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["mixture"]["general_passes"] > 1 and any("UPSAMPLED" in n for n in stats["mixture"]["notes"])
    assert any(r["copy"] > 0 for r in jsonl(tmp_path / "o" / "train.jsonl"))


def test_same_seed_byte_identical(run_a, corpus, tmp_path):
    out_a, _ = run_a
    bc.main(stage_cfg(corpus, tmp_path / "b", plot=True))
    data = sorted(str(p.relative_to(out_a)) for p in out_a.rglob("*.jsonl"))
    for rel in data:
        assert (out_a / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    bc.main(stage_cfg(corpus, tmp_path / "c", seed=1))
    assert (out_a / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_datatrove_engine_keeps_the_same_documents(run_a, corpus, tmp_path):
    out_a, _ = run_a
    bc.main(stage_cfg(corpus, tmp_path / "dt", engine="datatrove", num_proc=2))
    for rel in ("train.jsonl", "validation_domain.jsonl", "validation_general.jsonl"):
        assert (out_a / rel).read_bytes() == (tmp_path / "dt" / rel).read_bytes(), rel
    a = json.loads((out_a / "stats.json").read_text())["sources"]
    b = json.loads((tmp_path / "dt" / "stats.json").read_text())["sources"]
    assert {n: {s: e["dropped"] for s, e in v["steps"].items()} for n, v in a.items()} == \
        {n: {s: e["dropped"] for s, e in v["steps"].items()} for n, v in b.items()}


def test_steps_switch_off(corpus, tmp_path):
    metrics = bc.main(stage_cfg(corpus, tmp_path / "o", steps=["normalize"], replay_ratio=0.0, sft_stage=[],
                                eval=[], exclude=[], validation_fraction=0.0))
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert list(stats["sources"]["law"]["steps"]) == ["normalize", "language"]
    assert metrics["train_docs"] == 144  # nothing filtered, no dedup, no holdout, no replay


# --- bad input ------------------------------------------------------------------------------------

def test_bad_replay_ratio_and_missing_field_and_empty_source(corpus, tmp_path):
    with pytest.raises(UserError, match="replay_ratio"):
        stage_cfg(corpus, tmp_path / "o", replay_ratio=1.5)
    with pytest.raises(UserError, match=r"no field 'body' \(fields: id, text, law_name\)"):
        bc.main(stage_cfg(corpus, tmp_path / "o", text_field="body"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty source"):
        bc.main(stage_cfg(corpus, tmp_path / "o", general=[str(empty)]))
    with pytest.raises(UserError, match="holdout_field"):
        bc.main(stage_cfg(corpus, tmp_path / "o", holdout_field="chapter"))
    assert not (tmp_path / "o").exists()  # nothing written, nothing marked complete


def test_cli_error_is_one_line(corpus, tmp_path, capsys):
    from common.config import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(bc.main, bc.Config, ["--domain", str(corpus["domain"]), "--general", str(corpus["general_en"]),
                                      "--replay_ratio", "1.5", "--output_dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --replay_ratio must be in [0, 1]") and "\n" not in err


def test_refuses_non_empty_output(run_a, corpus):
    out, _ = run_a
    with pytest.raises(UserError, match="not empty"):
        bc.main(stage_cfg(corpus, out))
