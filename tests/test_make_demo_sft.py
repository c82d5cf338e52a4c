"""data/make_demo_sft.py on a tiny fake raw folder: message format, held-out-by-article splits,
SOE-only stage 3, MCQ answers, determinism and the relevance filter."""

import json
from pathlib import Path

import pytest

from common.config import make_config
from common.data import to_messages
from common.errors import UserError
from common.run import load_script

ROOT = Path(__file__).resolve().parents[1]
mds = load_script(ROOT / "data" / "make_demo_sft.py", "make_demo_sft")

SOE_LAW = "中华人民共和国企业国有资产法"
LAWS = {
    # law_id: (name, department, status, publish_date)
    "soe": (SOE_LAW, "经济法", "现行有效", "2008-10-28"),
    "company": ("中华人民共和国公司法", "民法商法", "现行有效", "2023-12-29"),
    "company_old": ("中华人民共和国公司法", "民法商法", "历史版本", "2018-10-26"),
    "bank": ("中华人民共和国商业银行法", "经济法", "现行有效", "2015-08-29"),
    "securities": ("中华人民共和国证券法", "经济法", "现行有效", "2019-12-28"),
    "criminal": ("中华人民共和国刑法", "刑法", "现行有效", "2023-12-29"),
    "criminal_amend": ("中华人民共和国刑法修正案（九）", "刑法", "现行有效", "2015-08-29"),
    "labour": ("中华人民共和国劳动法", "社会法", "现行有效", "2018-12-29"),
    "repealed": ("中华人民共和国经济合同法", "民法商法", "已废止", "1993-09-02"),
}
NUMERALS = "一二三四五六七八九"
SHARED_TEXT = "公司是企业法人，有独立的法人财产，享有法人财产权。公司以其全部财产对公司的债务承担责任。"


def law_articles() -> list[dict]:
    rows = []
    for law_id, (name, dept, status, date) in LAWS.items():
        for k in range(1, 7):
            text = f"{name}第{k}条的示例条文，规定第{k}项具体事项，适用于{law_id}领域的各类主体和活动。"
            if law_id == "soe" and k == 2:
                text = "本法所称国家出资企业，是指国家出资的国有独资企业、国有独资公司，以及国有资本控股公司。"
            if law_id == "company" and k == 3:
                text = "国有独资公司章程由履行出资人职责的机构制定，公司治理应当符合本法规定。"
            if law_id in ("company", "company_old") and k == 4:
                text = SHARED_TEXT  # unchanged between the two versions: must never be held out
            if k == 6:
                text = "本法自公布之日起施行。"
            rows.append({
                "id": f"law-{law_id}-{k}", "text": text, "law_id": law_id, "law_name": name,
                "article_no": f"第{NUMERALS[k - 1]}条", "article_no_arabic": k,
                "chapter": "第一章 总则" if k <= 3 else None, "section": None, "department": dept,
                "status": status, "doc_type": "法律", "level": "法律",
                "issuing_body": "全国人民代表大会常务委员会", "publish_date": date,
            })
    return rows


FINANCE_WIKI = {
    "id": "wiki-1", "title": "Central bank", "description": "Public institution managing a currency",
    "topic": "Society and social sciences",
    "text": "A central bank is a public institution that manages the monetary policy of a country. "
            "It regulates commercial banks and sets interest rates to control inflation. "
            "Most central banks are independent of the government. They also act as lender of last resort.",
}
PEACH_WIKI = {
    "id": "wiki-2", "title": "Peach", "description": "Type of fruit tree, or its fruit",
    "topic": "Biology and health sciences",
    "text": "The peach is a deciduous tree that bears edible juicy fruits. Most are simply called peaches. "
            "The glossy-skinned varieties are called nectarines. They grow well in warm regions.",
}
WIKI = [
    FINANCE_WIKI, PEACH_WIKI,
    {"id": "wiki-3", "title": "Supreme court", "description": "Highest court in a legal system", "topic": "",
     "text": "A supreme court is the highest court within the hierarchy of courts in most legal jurisdictions. "
             "Its decisions on law are binding on all other courts. Dr. Smith wrote about it in the U.S. journal."},
    {"id": "wiki-4", "title": "Stock market", "description": "Place where shares are traded", "topic": "",
     "text": "A stock market is where investors buy and sell shares of companies. "
             "The market helps a business raise capital. Prices change with the economy."},
]
PD = [
    {"id": "pd-199801-00001", "date": "1998-01", "page": None,
     "text": "国有企业改革取得新进展\n本报北京１２月３１日讯 国务院今天召开会议，部署国有企业改革和银行金融工作。"
             "会议指出，要继续深化企业改革，加强市场监管。\n会议还讨论了财政预算和投资政策等问题，要求各地区认真落实。"},
    {"id": "pd-199801-00002", "date": "1998-01", "page": None,
     "text": "北方迎来今冬第一场大雪\n新华社哈尔滨１月２日电 昨天夜里，黑龙江大部分地区普降大雪，"
             "田野和村庄一片银白。\n孩子们在雪地里堆雪人、打雪仗，到处是欢声笑语，一派冬日美景。"},
    {"id": "pd-199801-00003", "date": "1998-01", "page": None,
     "text": "人民代表大会审议预算报告\n本报北京１月３日讯 全国人民代表大会常务委员会今天审议财政预算报告，"
             "强调依法加强审计监督和税收征管。\n委员们认为，政府要严格执行预算，依照法律规定管理财政资金。"},
]
BENCH = [
    {"question": "To keep bread fresh longer,", "A": "store it in a sealed bag.", "B": "leave it in the sun.",
     "answer": "A"},
    {"question": "How do you cool soup quickly?", "A": "Put it on the stove.", "B": "Stir it in a cold water bath.",
     "answer": "B"},
]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def raw_dir(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "laws.jsonl", law_articles())
    write(raw / "wiki_en.jsonl", WIKI)
    write(raw / "peoples_daily.jsonl", PD)
    write(raw / "bench" / "piqa.jsonl", BENCH)
    return raw


def run(raw_dir, out_dir, **overrides):
    values = {"raw_dir": str(raw_dir), "out_dir": str(out_dir), "seed": 0, "general_train": 50, "law_train": 30,
              "soe_train": 12, "test_share": 0.3, "max_test": 6, "eval_articles": 3, "law_qa_size": 2}
    values.update(overrides)
    return mds.main(make_config(mds.Config, values))


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


STAGES = ("1_general", "2_law", "3_soe")


def test_writes_the_expected_files_with_valid_messages(raw_dir, tmp_path):
    out = tmp_path / "out"
    result = run(raw_dir, out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["eval/general_ppl_bench.jsonl", "eval/law_mcq.jsonl", "eval/law_qa.jsonl",
                     "sft/1_general/test.jsonl", "sft/1_general/train.jsonl", "sft/2_law/test.jsonl",
                     "sft/2_law/train.jsonl", "sft/3_soe/test.jsonl", "sft/3_soe/train.jsonl",
                     "sft/heldout_articles.jsonl"]
    for stage in STAGES:
        for split in ("train", "test"):
            rows = load(out / "sft" / stage / f"{split}.jsonl")
            assert rows, (stage, split)
            assert result["counts"][f"sft/{stage}/{split}"] == len(rows)
            for row in rows:
                messages = to_messages(row)  # the project's own SFT check
                assert [m["role"] for m in messages] == ["user", "assistant"]
                assert all(m["content"].strip() for m in messages)
                assert row["template"] and row["source_id"]
    law_qa = load(out / "eval" / "law_qa.jsonl")
    assert len(law_qa) == 2 and all(to_messages(r) for r in law_qa)
    ppl = load(out / "eval" / "general_ppl_bench.jsonl")
    assert {r["text"] for r in ppl} == {"To keep bread fresh longer, store it in a sealed bag.",
                                        "How do you cool soup quickly? Stir it in a cold water bath."}


def test_held_out_by_article_and_excluded_from_all_training(raw_dir, tmp_path):
    out = tmp_path / "out"
    run(raw_dir, out)
    heldout = {r["id"]: r for r in load(out / "sft" / "heldout_articles.jsonl")}
    assert heldout
    train_sources = set()
    for stage in STAGES:
        train = {r["source_id"] for r in load(out / "sft" / stage / "train.jsonl")}
        test = {r["source_id"] for r in load(out / "sft" / stage / "test.jsonl")}
        assert not train & test, stage
        train_sources |= train
        if stage != "1_general":
            assert test <= set(heldout)
    assert not train_sources & set(heldout)
    articles = {a["id"]: a for a in law_articles()}
    for aid, row in heldout.items():
        assert row["text"] == articles[aid]["text"]
        assert articles[aid]["status"] == "现行有效"
        # a text that another record (here the older version of the law) also carries is never held out
        assert row["text"] != SHARED_TEXT and not row["text"].startswith("本法自")
    for row in load(out / "eval" / "law_qa.jsonl") + load(out / "eval" / "law_mcq.jsonl"):
        assert row["source_id"] in heldout


def test_content_questions_only_from_current_laws_and_soe_stage_only_soe(raw_dir, tmp_path):
    out = tmp_path / "out"
    run(raw_dir, out)
    articles = {a["id"]: a for a in law_articles()}
    for stage in ("2_law", "3_soe"):
        for split in ("train", "test"):
            for row in load(out / "sft" / stage / f"{split}.jsonl"):
                if row["source_id"].startswith("lawmeta-"):
                    assert split == "train" and row["template"] in ("law_status", "law_department", "law_issuer")
                    continue
                art = articles[row["source_id"]]
                assert art["status"] == "现行有效"
                is_soe = art["law_name"] == SOE_LAW or any(
                    k in art["text"] for k in ("国有资产", "国有企业", "国家出资企业", "国有独资"))
                assert is_soe == (stage == "3_soe"), (stage, art["id"])
    soe_rows = load(out / "sft" / "3_soe" / "train.jsonl")
    assert any(r["source_id"] == "law-company-3" or r["source_id"].startswith("law-soe-") for r in soe_rows)
    assert {r["source_id"] for r in soe_rows if r["source_id"].startswith("lawmeta-")} <= {"lawmeta-soe"}
    # the law-level status question of a name with several versions says which version
    law_train = load(out / "sft" / "2_law" / "train.jsonl")
    statuses = [r["messages"][0]["content"] for r in law_train if r["template"] == "law_status"]
    assert all(("公布的" in q) == ("公司法" in q) for q in statuses)


def test_templates_answer_from_the_article(raw_dir, tmp_path):
    out = tmp_path / "out"
    run(raw_dir, out)
    articles = {a["id"]: a for a in law_articles()}
    rows = [r for s in ("2_law", "3_soe") for sp in ("train", "test") for r in load(out / "sft" / s / f"{sp}.jsonl")]
    seen = set()
    for row in rows:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        seen.add(row["template"])
        if row["template"] == "law_recall":
            art = articles[row["source_id"]]
            assert user == f"《{art['law_name']}》{art['article_no']}规定了什么？" and answer == art["text"]
        elif row["template"] == "law_source":
            art = articles[row["source_id"]]
            assert art["text"][:20] in user and answer == f"该条文出自《{art['law_name']}》{art['article_no']}。"
        elif row["template"] == "law_chapter":
            assert answer.endswith("位于第一章 总则。")
    assert {"law_recall", "law_source", "law_chapter"} <= seen


def test_mcq_answer_points_at_the_right_law(raw_dir, tmp_path):
    out = tmp_path / "out"
    run(raw_dir, out)
    articles = {a["id"]: a for a in law_articles()}
    mcq = load(out / "eval" / "law_mcq.jsonl")
    assert len(mcq) == len(load(out / "sft" / "heldout_articles.jsonl"))
    for item in mcq:
        art = articles[item["source_id"]]
        options = [item[k] for k in "ABCD"]
        assert item[item["answer"]] == f"《{art['law_name']}》"
        assert len(set(options)) == 4
        assert art["text"][:20] in item["question"]
        for other in options:
            if other != item[item["answer"]]:
                assert mds.distinct_laws(other.strip("《》"), art["law_name"])
    assert len({item["answer"] for item in mcq}) > 1 or len(mcq) < 4


def test_same_seed_same_bytes_and_idempotent(raw_dir, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(raw_dir, a)
    run(raw_dir, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    before = {f: (a / f).read_bytes() for f in files}
    run(raw_dir, a)  # again into the same folder
    assert {f: (a / f).read_bytes() for f in files} == before
    assert not list(a.rglob("*.tmp"))
    run(raw_dir, c, seed=1)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_relevance_filter_keeps_finance_and_drops_unrelated(raw_dir, tmp_path):
    assert mds.keyword_hits(FINANCE_WIKI["text"]) >= 2
    assert mds.keyword_hits(PEACH_WIKI["text"]) == 0
    assert mds.keyword_hits(PD[0]["text"]) >= 2 and mds.keyword_hits(PD[1]["text"]) == 0

    def general_sources(out):
        return {r["source_id"] for sp in ("train", "test") for r in load(out / "sft" / "1_general" / f"{sp}.jsonl")}

    result = run(raw_dir, tmp_path / "on")
    kept = general_sources(tmp_path / "on")
    assert {"wiki-1", "pd-199801-00001"} <= kept and not {"wiki-2", "pd-199801-00002"} & kept
    assert result["general"]["wiki_en"]["read"] == 4 and result["general"]["wiki_en"]["kept_relevant"] == 3
    assert result["general"]["peoples_daily"]["kept_relevant"] == 2
    run(raw_dir, tmp_path / "off", relevance_filter=False)
    assert {"wiki-2", "pd-199801-00002"} <= general_sources(tmp_path / "off")


def test_general_templates(raw_dir, tmp_path):
    assert mds.en_sentences(WIKI[2]["text"])[-1] == "Dr. Smith wrote about it in the U.S. journal."
    assert mds.zh_first_sentence("本报讯 今天开会。会议很好。") == "本报讯 今天开会。"
    by_template = {}
    for rec in WIKI:
        for ex in mds.wiki_examples(rec, 1200):
            by_template.setdefault(ex["template"], []).append(ex)
    for rec in PD:
        for ex in mds.pd_examples(rec, 600):
            by_template.setdefault(ex["template"], []).append(ex)
    assert set(by_template) == {"wiki_what_is", "wiki_describe", "wiki_short", "wiki_summarize",
                                "pd_summary", "pd_headline", "pd_dateline"}
    what = {ex["source_id"]: ex["messages"] for ex in by_template["wiki_what_is"]}
    assert what["wiki-1"][0]["content"] == "What is Central bank?"
    assert what["wiki-1"][1]["content"] == mds.en_sentences(FINANCE_WIKI["text"])[0]
    pd = {(ex["source_id"], ex["template"]): ex["messages"][1]["content"]
          for t in ("pd_summary", "pd_headline", "pd_dateline") for ex in by_template[t]}
    assert pd[("pd-199801-00001", "pd_headline")] == "国有企业改革取得新进展"
    assert pd[("pd-199801-00001", "pd_dateline")] == "这篇报道于１２月３１日发出。"
    assert pd[("pd-199801-00002", "pd_summary")].startswith("昨天夜里，黑龙江")
    assert all("国有企业改革取得新进展" not in ex["messages"][0]["content"] for ex in by_template["pd_headline"])


def test_bad_input_is_one_clear_error(raw_dir, tmp_path):
    with pytest.raises(UserError, match="laws.jsonl: no such file"):
        run(tmp_path / "nowhere", tmp_path / "out")
    with (raw_dir / "wiki_en.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "wiki-9", "text": "no title"}\n')
    with pytest.raises(UserError, match=r"wiki_en.jsonl:5: missing field 'title'"):
        run(raw_dir, tmp_path / "out")
    with pytest.raises(UserError, match="test_share"):
        make_config(mds.Config, {"test_share": 1.5})
