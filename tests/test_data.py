"""Readers, malformed-record reporting, JSONL writing and SFT normalization in common/data.py."""

import json
import sqlite3

import pytest

from common.data import ReadStats, normalize_sft, read_jsonl, read_records, to_messages, write_jsonl
from common.errors import UserError


def strip_meta(records):
    return [{k: v for k, v in r.items() if k not in ("_source", "_line")} for r in records]


def read_all(src, **kw):
    stats = ReadStats()
    warnings = []
    records = list(read_records(src, stats=stats, warn=warnings.append, **kw))
    return records, stats, warnings


# --- readers -------------------------------------------------------------------------------------


def test_jsonl_records_carry_source_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1, "text": "甲"}\n\n{"id": 2, "text": "b"}\n', encoding="utf-8")
    records, stats, warnings = read_all(path)
    assert records == [
        {"id": 1, "text": "甲", "_source": str(path), "_line": 1},
        {"id": 2, "text": "b", "_source": str(path), "_line": 3},
    ]
    assert (stats.read, stats.malformed, stats.undecodable, warnings) == (2, 0, 0, [])


def test_malformed_jsonl_lines_reported_counted_and_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok1"}\n{"text": \n[1, 2]\n{"text": "ok2"}\n', encoding="utf-8")
    records, stats, warnings = read_all(path)
    assert [(r["text"], r["_line"]) for r in records] == [("ok1", 1), ("ok2", 4)]
    assert stats.as_dict() == {
        "read": 2, "malformed": 2, "undecodable": 0,
        "by_reason": {"invalid JSON": 1, "not a JSON object": 1},
    }
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{path}:2: invalid JSON")
    assert warnings[1].startswith(f"{path}:3: not a JSON object")


def test_json_list_dict_of_records_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"text": "a"}, 5, {"text": "b"}]), encoding="utf-8")
    records, stats, warnings = read_all(as_list)
    assert [(r["text"], r["_line"]) for r in records] == [("a", 1), ("b", 3)]
    assert stats.malformed == 1 and warnings[0].startswith(f"{as_list}:2: not a JSON object")

    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"Paris": {"extract": "capital"}, "Rome": {"extract": "city"}}), encoding="utf-8")
    records, _, _ = read_all(as_dict, text_field="extract")
    assert strip_meta(records) == [{"extract": "capital", "_key": "Paris"}, {"extract": "city", "_key": "Rome"}]
    assert [r["_line"] for r in records] == [1, 2]

    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "x"}\nnot json\n{"text": "y"}\n', encoding="utf-8")
    records, stats, _ = read_all(lines)
    assert [(r["text"], r["_line"]) for r in records] == [("x", 1), ("y", 3)]
    assert stats.by_reason == {"invalid JSON": 1}


def test_broken_json_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.json:2: invalid JSON"):
        read_all(path)


def test_txt_lines_and_paragraphs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\nsecond line\n\n  \nthird\r\nfourth\n", encoding="utf-8")
    records, _, _ = read_all(path)
    assert [(r["text"], r["_line"]) for r in records] == [
        ("first line", 1), ("second line", 2), ("third", 5), ("fourth", 6)
    ]
    records, _, _ = read_all(path, txt_mode="paragraph")
    assert [(r["text"], r["_line"]) for r in records] == [("first line\nsecond line", 1), ("third\nfourth", 5)]
    assert set(records[0]) == {"text", "_source", "_line"}


def test_csv_rows_numbered_from_line_2_and_quoted_newlines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text\n1,hello\n2,"two\nlines, with comma"\n3,end\n', encoding="utf-8")
    records, stats, _ = read_all(path, text_field="text")
    assert strip_meta(records) == [
        {"id": "1", "text": "hello"}, {"id": "2", "text": "two\nlines, with comma"}, {"id": "3", "text": "end"}
    ]
    assert [r["_line"] for r in records] == [2, 3, 5]
    assert stats.read == 3


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text\n1,a\n2,b,extra\n3\n4,d\n5,"bad"quote\n6,f\n', encoding="utf-8")
    records, stats, warnings = read_all(path)
    assert [(r["id"], r["_line"]) for r in records] == [("1", 2), ("4", 5), ("6", 7)]
    assert stats.by_reason == {"wrong number of fields": 2, "unreadable csv row": 1}
    assert warnings[:2] == [
        f"{path}:3: wrong number of fields (3 instead of 2)",
        f"{path}:4: wrong number of fields (1 instead of 2)",
    ]
    assert warnings[2].startswith(f"{path}:6: unreadable csv row")


def test_tsv(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("id\ttext\na\tx, y\nb\tz\n", encoding="utf-8")
    records, _, _ = read_all(path)
    assert strip_meta(records) == [{"id": "a", "text": "x, y"}, {"id": "b", "text": "z"}]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": [1, 2, 3], "text": ["a", None, "c"]}).to_parquet(path)
    records, stats, warnings = read_all(path, text_field="text")
    assert strip_meta(records) == [{"id": 1, "text": "a"}, {"id": 3, "text": "c"}]
    assert [r["_line"] for r in records] == [1, 3]
    assert stats.by_reason == {"missing field 'text'": 1}
    assert warnings[0].startswith(f"{path}:2: missing field 'text'")


def make_db(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE articles (id INTEGER, law TEXT, body TEXT)")
    con.executemany("INSERT INTO articles VALUES (?, ?, ?)", [(1, "公司法", "第一条"), (2, "证券法", "第二条"), (3, "公司法", "第三条")])
    con.commit()
    con.close()


def test_sqlite_bare_table_and_query(tmp_path):
    db = tmp_path / "laws.db"
    make_db(db)
    records, _, _ = read_all(db)
    assert [r["body"] for r in records] == ["第一条", "第二条", "第三条"]
    assert records[0]["_source"] == f"{db}::articles" and [r["_line"] for r in records] == [1, 2, 3]

    records, _, _ = read_all(f"{db}::articles")
    assert len(records) == 3

    records, _, _ = read_all(f"{db}::SELECT id, body AS text FROM articles WHERE law = '公司法'", text_field="text")
    assert strip_meta(records) == [{"id": 1, "text": "第一条"}, {"id": 3, "text": "第三条"}]
    assert records[0]["_source"] == str(db)


def test_sqlite_table_choice_errors(tmp_path):
    db = tmp_path / "two.sqlite"
    make_db(db)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE laws (law TEXT)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match=r"has 2 tables.*tables: articles, laws"):
        read_records(db)
    with pytest.raises(UserError, match=r"no table 'nope' \(tables: articles, laws\)"):
        read_records(f"{db}::nope")
    with pytest.raises(UserError, match="SQL error"):
        list(read_records(f"{db}::SELECT missing_column FROM laws"))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_list([{"text": "a", "n": 1}, {"text": "b", "n": 2}])
    single.save_to_disk(str(tmp_path / "single"))
    records, _, _ = read_all(tmp_path / "single")
    assert strip_meta(records) == [{"text": "a", "n": 1}, {"text": "b", "n": 2}]
    assert [r["_line"] for r in records] == [1, 2]

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "t1"}, {"text": "t2"}]),
        test=datasets.Dataset.from_list([{"text": "e1"}]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    records, _, _ = read_all(tmp_path / "dd")
    assert [(r["text"], r["_source"]) for r in records] == [
        ("t1", f"{tmp_path / 'dd'}::train"), ("t2", f"{tmp_path / 'dd'}::train"), ("e1", f"{tmp_path / 'dd'}::test")
    ]
    records, _, _ = read_all(f"{tmp_path / 'dd'}::test")
    assert [r["text"] for r in records] == ["e1"]
    with pytest.raises(UserError, match=r"no split 'dev' \(splits: train, test\)"):
        read_records(f"{tmp_path / 'dd'}::dev")


def test_glob_and_folder(tmp_path):
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    (tmp_path / "raw" / "b.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "raw" / "a.txt").write_text("a1\na2\n", encoding="utf-8")
    (tmp_path / "raw" / "sub" / "c.csv").write_text("text\nc\n", encoding="utf-8")
    (tmp_path / "raw" / "README.md").write_text("not data\n", encoding="utf-8")
    (tmp_path / "raw" / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    make_db(tmp_path / "raw" / "sub" / "d.db")

    records, stats, _ = read_all(tmp_path / "raw")
    assert [r.get("text") or r["body"] for r in records] == ["a1", "a2", "b", "c", "第一条", "第二条", "第三条"]
    assert [r["_source"] for r in records][-1] == f"{tmp_path / 'raw' / 'sub' / 'd.db'}::articles"
    assert stats.read == 7
    # Every source must have the text field: the database has none.
    with pytest.raises(UserError, match=r"d\.db::articles: no field 'text' \(fields: id, law, body\)"):
        list(read_records(tmp_path / "raw", text_field="text"))

    records, _, _ = read_all(str(tmp_path / "raw" / "*.jsonl"))
    assert [r["text"] for r in records] == ["b"]
    records, _, _ = read_all(str(tmp_path / "raw" / "**" / "*.db") + "::SELECT body FROM articles LIMIT 1")
    assert strip_meta(records) == [{"body": "第一条"}]
    with pytest.raises(UserError, match="no files match"):
        read_records(str(tmp_path / "raw" / "*.parquet"))


def test_folder_without_data_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="no readable files"):
        read_records(tmp_path)
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file or folder"):
        read_records(tmp_path / "nope.jsonl")  # raised at the call, before iteration
    with pytest.raises(UserError, match="unsupported file type '.md'"):
        (tmp_path / "x.md").write_text("x")
        read_records(tmp_path / "x.md")


def test_undecodable_bytes_replaced_and_counted(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n{"text": "also \xfe\xfe"}\n')
    records, stats, warnings = read_all(path)
    assert [r["text"] for r in records] == ["ok", "bad \ufffd byte", "also \ufffd\ufffd"]
    assert (stats.read, stats.undecodable, stats.malformed) == (3, 2, 0)
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:2: ")

    txt = tmp_path / "u.txt"
    txt.write_bytes("中文\n".encode() + b"\xe4\xb8\n")  # a truncated multi-byte character
    records, stats, _ = read_all(txt)
    assert [r["text"] for r in records] == ["中文", "\ufffd"] and stats.undecodable == 1


def test_missing_text_field_in_whole_source_lists_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1, "body": "a"}\n{"id": 2, "body": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"x\.jsonl: no field 'text' \(fields: id, body\)") as info:
        list(read_records(path, text_field="text"))
    assert "\n" not in str(info.value)


def test_missing_text_field_in_some_records_is_malformed(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "text": "b"}\n{"id": 3, "text": 7}\n{"id": 4}\n', encoding="utf-8")
    records, stats, warnings = read_all(path, text_field="text")
    assert [r["id"] for r in records] == [2]
    assert stats.by_reason == {"missing field 'text'": 3} and stats.malformed == 3 and stats.read == 1
    assert [w.split(": ")[0] for w in warnings] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_warnings_capped_but_all_counted(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("oops\n" * 30 + '{"text": "fine"}\n', encoding="utf-8")
    records, stats, warnings = read_all(path)
    assert len(records) == 1 and stats.malformed == 30
    assert len(warnings) == 21 and "10 more malformed records" in warnings[-1]


def test_read_stats_merge():
    a = ReadStats(read=2, malformed=1, by_reason={"invalid JSON": 1})
    b = ReadStats(read=3, malformed=2, undecodable=1, by_reason={"invalid JSON": 1, "x": 1})
    a.update(b)
    assert a.as_dict() == {"read": 5, "malformed": 3, "undecodable": 1, "by_reason": {"invalid JSON": 2, "x": 1}}


# --- JSONL writing -------------------------------------------------------------------------------


def test_write_and_read_jsonl_roundtrip(tmp_path):
    path = tmp_path / "out" / "x.jsonl"
    rows = [{"text": "公司法第一条", "n": 1}, {"text": "b", "n": 2}]
    assert write_jsonl(path, iter(rows)) == 2
    assert "公司法" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert list(read_jsonl(path)) == rows
    assert [p.name for p in path.parent.iterdir()] == ["x.jsonl"]  # no temporary file left


def test_write_jsonl_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert list(read_jsonl(path)) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_read_jsonl_is_strict(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"x\.jsonl:2: invalid JSON"):
        list(read_jsonl(path))


# --- SFT normalization ---------------------------------------------------------------------------

U, A = "user", "assistant"


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, [(U, "q"), (A, "a")]),
        (
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            [("system", "s"), (U, "q"), (A, "a")],
        ),
        ({"prompt": "q", "completion": "a"}, [(U, "q"), (A, "a")]),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
            [(U, "q"), (A, "a")],
        ),
        ({"instruction": "Summarize.", "input": "Long text.", "output": "Short."}, [(U, "Summarize.\n\nLong text."), (A, "Short.")]),
        ({"instruction": "Say hi.", "input": "", "output": "Hi."}, [(U, "Say hi."), (A, "Hi.")]),
        ({"instruction": "Say hi.", "output": "Hi."}, [(U, "Say hi."), (A, "Hi.")]),
        ({"question": "什么是公司法？", "answer": "一部法律。"}, [(U, "什么是公司法？"), (A, "一部法律。")]),
        ({"system": "You are a lawyer.", "question": "q", "answer": "a"}, [("system", "You are a lawyer."), (U, "q"), (A, "a")]),
        ({"messages": None, "question": "q", "answer": "a"}, [(U, "q"), (A, "a")]),  # columnar null
    ],
)
def test_to_messages_forms(record, expected):
    assert to_messages(record) == [{"role": r, "content": c} for r, c in expected]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"text": "plain"}, "no SFT form matched"),
        ({"prompt": "q"}, "field 'completion' missing"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}, "not text"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message is not from the assistant"),
        ({"question": "q", "answer": "  "}, "empty message content"),
        ({"instruction": "i", "output": 5}, "field 'output' is int"),
        (
            {"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]},
            "both a 'system' field and a system message",
        ),
    ],
)
def test_to_messages_rejects(record, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(record)


def test_normalize_sft_keeps_metadata_and_counts_invalid(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        '{"id": "a", "instruction": "i", "output": "o"}\n'
        '{"id": "b", "text": "no form"}\n'
        '{"id": "c", "question": "q", "answer": "x", "system": "s"}\n',
        encoding="utf-8",
    )
    stats = ReadStats()
    warnings = []
    out = list(normalize_sft(read_records(path, stats=stats), stats=stats, warn=warnings.append))
    assert out == [
        {"messages": [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}],
         "id": "a", "_source": str(path), "_line": 1},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "x"}],
         "id": "c", "_source": str(path), "_line": 3},
    ]
    assert stats.malformed == 1 and stats.read == 3
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:2: no SFT form matched")
