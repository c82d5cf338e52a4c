"""Evaluation harness: MCQ loading and errors, prompt assembly, forced-answer accuracy,
generation metrics, retention maths, evaluate_model and the command line. Offline, CPU,
a tiny random Llama whose head is rigged so the right answer is known in advance."""

import json
import math

import pytest
import torch

from common import eval as ev
from common.errors import UserError
from common.metrics import perplexity, text_metrics

CORPUS = [
    "The following are multiple choice questions ( with answers ) about",
    "Answer : A B C D . user assistant system",
    "What sat on the mat ? the cat the dog a bird nothing",
    "Where is the park ? here there",
    "a dog ran in the park and the cat sat on the mat .",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if chat:
        hf.chat_template = TEMPLATE
    return hf


def make_model(tok, favour: str | None = None, seed: int = 0):
    """Tiny random Llama; with `favour`, its head ignores the input and always prefers that token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    if favour is not None:
        head = torch.nn.Linear(config.hidden_size, len(tok), bias=True)
        head.weight.data.zero_()
        head.bias.data.zero_()
        head.bias.data[tok.convert_tokens_to_ids(favour)] = 10.0
        model.lm_head = head
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def item(question, choices, answer, line=0):
    return {"question": question, "choices": list(choices), "answer": answer, "source": "mem", "line": line}


CHOICES = ["the cat", "the dog", "a bird", "nothing"]
# answers: B is right in 2 of 4 ("alpha") and 1 of 4 ("beta") questions -> 3 of 8 overall
ANSWERS = {"alpha": "BABC", "beta": "DBAC"}


def forced_items():
    return {
        s: [item(f"What sat on the mat ? {i}", CHOICES, a, i) for i, a in enumerate(answers)]
        for s, answers in ANSWERS.items()
    }


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# retention / domain gain


def test_retention_maths():
    assert ev.retention(0.50, 0.40, "acc") == pytest.approx(0.8)
    assert ev.retention(0.50, 0.55) == pytest.approx(1.1)  # acc is the default
    assert ev.retention(20.0, 25.0, "ppl") == pytest.approx(0.8)  # perplexity rose: 80% kept
    assert ev.retention(20.0, 16.0, "ppl") == pytest.approx(1.25)
    assert ev.domain_gain(0.30, 0.324, "rouge1") == pytest.approx(1.08)
    assert ev.domain_gain(12.0, 14.04, "bleu4") == pytest.approx(1.17)
    assert ev.domain_gain(11.8, 4.9, "ppl") == pytest.approx(11.8 / 4.9)
    assert math.isnan(ev.retention(0.0, 0.5, "acc"))
    assert math.isnan(ev.retention(10.0, 0.0, "ppl"))
    with pytest.raises(ValueError, match="unknown kind"):
        ev.retention(1, 2, "speed")


# ---------------------------------------------------------------------------------------------
# Loading MCQ files


def test_load_ceval_layout(tmp_path):
    head = "id,question,A,B,C,D,answer"
    write(tmp_path / "law_val.csv", f"{head}\n0,Q1,a,b,c,d,B\n1,\"Q2, with comma\",a,b,c,d,d\n")
    write(tmp_path / "law_dev.csv", f"{head},explanation\n0,D1,a,b,c,d,A,because\n1,D2,a,b,c,d,C,so\n")
    write(tmp_path / "law_test.csv", f"{head}\n0,T1,a,b,c,d,\n")  # C-Eval's test split has no answers
    val = ev.load_mcq(tmp_path, "val")
    assert list(val) == ["law"]
    assert val["law"][1] == {
        "question": "Q2, with comma", "choices": ["a", "b", "c", "d"], "answer": "D",
        "source": str(tmp_path / "law_val.csv"), "line": 3,
    }
    dev = ev.find_dev(tmp_path)
    assert [i["question"] for i in dev["law"]] == ["D1", "D2"]
    with pytest.raises(UserError, match=r"law_test\.csv:2: answer '' is not one of A, B, C, D"):
        ev.load_mcq(tmp_path)


def test_load_cmmlu_layout(tmp_path):
    head = ",Question,A,B,C,D,Answer"
    write(tmp_path / "dev" / "law.csv", f"{head}\n0,D1,a,b,c,d,A\n")
    write(tmp_path / "test" / "law.csv", f"{head}\n0,T1,a,b,c,d,C\n1,T2,a,b,c,d,B\n")
    write(tmp_path / "test" / "art.csv", f"{head}\n0,T3,a,b,c,d,A\n")
    test = ev.load_mcq(tmp_path)
    assert sorted(test) == ["art", "law"]
    assert [i["answer"] for i in test["law"]] == ["C", "B"]
    assert ev.find_dev(tmp_path)["law"][0]["question"] == "D1"
    assert ev.find_dev(tmp_path / "test" / "law.csv")["law"][0]["question"] == "D1"
    assert ev.load_mcq(tmp_path / "test" / "law.csv") == {"law": test["law"]}


def test_load_mmlu_headerless(tmp_path):
    write(tmp_path / "dev" / "anatomy_dev.csv", "What is 1+1?,1,2,3,4,B\n")
    write(tmp_path / "test" / "anatomy_test.csv", '"A question\nover two lines",w,x,y,z,D\nSecond?,w,x,y,z,A\n')
    test = ev.load_mcq(tmp_path)
    assert list(test) == ["anatomy"]
    assert test["anatomy"][0]["question"] == "A question\nover two lines"
    assert test["anatomy"][0]["choices"] == ["w", "x", "y", "z"]
    assert [i["answer"] for i in test["anatomy"]] == ["D", "A"]
    assert [i["line"] for i in test["anatomy"]] == [2, 3]
    assert ev.find_dev(tmp_path / "test" / "anatomy_test.csv")["anatomy"][0]["answer"] == "B"
    assert ev.load_mcq(tmp_path, "dev")["anatomy"][0]["question"] == "What is 1+1?"


def test_load_jsonl_folder(tmp_path):
    write(tmp_path / "piqa.jsonl", '{"question": "g", "A": "x", "B": "y", "answer": "B"}\n\n{"question": "h", "A": "x", "B": "y", "answer": 0}\n')
    write(tmp_path / "csqa.jsonl", json.dumps({"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "E": "5", "answer": "e"}) + "\n")
    got = ev.load_mcq(tmp_path)
    assert sorted(got) == ["csqa", "piqa"]
    assert [i["answer"] for i in got["piqa"]] == ["B", "A"]  # an integer label is an index
    assert got["piqa"][1]["line"] == 3
    assert got["csqa"][0]["choices"] == ["1", "2", "3", "4", "5"] and got["csqa"][0]["answer"] == "E"
    assert ev.find_dev(tmp_path) is None


def test_bad_mcq_input(tmp_path):
    f = write(tmp_path / "a.csv", "question,A,B,C,D\nq,a,b,c,d\n")
    with pytest.raises(UserError, match=r"a\.csv:2: missing column 'answer' \(columns: question, A, B, C, D\)"):
        ev.load_mcq(f)
    f = write(tmp_path / "b.csv", "question,A,B,C,D,answer\nq,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(UserError, match=r"b\.csv:3: answer 'E' is not one of A, B, C, D"):
        ev.load_mcq(f)
    f = write(tmp_path / "c.csv", "question,A,B,C,D,answer\n")
    with pytest.raises(UserError, match=r"c\.csv: no questions \(empty subject\)"):
        ev.load_mcq(f)
    f = write(tmp_path / "d.jsonl", "")
    with pytest.raises(UserError, match=r"d\.jsonl: no questions \(empty subject\)"):
        ev.load_mcq(f)
    f = write(tmp_path / "e.jsonl", '{"question": "q", "A": "a", "B": "b", "answer": "A"}\n{"question": "q", "A": "a", "B": "b"}\n')
    with pytest.raises(UserError, match=r"e\.jsonl:2: missing column 'answer' \(columns: question, A, B\)"):
        ev.load_mcq(f)
    f = write(tmp_path / "f.jsonl", '{"question": "q", "A": "a", "B": "b", "D": "d", "answer": "A"}\n')
    with pytest.raises(UserError, match=r"f\.jsonl:1: missing option column 'C'"):
        ev.load_mcq(f)
    f = write(tmp_path / "g.jsonl", '{"question": "q", "A": "a", "B": "b", "answer": "A"}\nnot json\n')
    with pytest.raises(UserError, match=r"g\.jsonl:2: invalid JSON"):
        ev.load_mcq(f)
    f = write(tmp_path / "h.csv", "question,A,B,C,D,answer\nq,a,b,c,d\n")
    with pytest.raises(UserError, match=r"h\.csv:2: 5 fields but the header has 6"):
        ev.load_mcq(f)
    with pytest.raises(UserError, match="no such file or folder"):
        ev.load_mcq(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no test question files"):
        ev.load_mcq(empty)


# ---------------------------------------------------------------------------------------------
# Prompts

Q = item("What sat on the mat?", CHOICES, "A")
SHOTS = [item("Where is the park?", ["here", "there"], "B"), item("Where is the cat?", ["on the mat", "in the park"], "A")]


def test_kshot_prompt_exact():
    got = ev.build_mcq_prompt(Q, SHOTS, "high_school_biology")
    assert got == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Where is the park?\nA. here\nB. there\nAnswer: B\n\n"
        "Where is the cat?\nA. on the mat\nB. in the park\nAnswer: A\n\n"
        "What sat on the mat?\nA. the cat\nB. the dog\nC. a bird\nD. nothing\nAnswer:"
    )
    assert ev.build_mcq_prompt(Q) == "What sat on the mat?\nA. the cat\nB. the dog\nC. a bird\nD. nothing\nAnswer:"
    got = ev.build_mcq_prompt(Q, SHOTS[:1], "law", score="option")
    assert got == (
        "The following are multiple choice questions (with answers) about law.\n\n"
        "Where is the park?\nAnswer: there\n\n"
        "What sat on the mat?\nAnswer:"
    )
    tok = make_tokenizer(chat=True)
    got = ev.build_mcq_prompt(Q, SHOTS[:1], "law", mode="chat", tokenizer=tok)
    assert got == "user: " + ev.build_mcq_prompt(Q, SHOTS[:1], "law") + "\nassistant:"
    assert ev.mcq_continuations(Q) == [" A", " B", " C", " D"]
    assert ev.mcq_continuations(Q, "chat") == ["A", "B", "C", "D"]
    assert ev.mcq_continuations(Q, "plain", "option") == [" the cat", " the dog", " a bird", " nothing"]
    with pytest.raises(UserError, match="chat template"):
        ev.build_mcq_prompt(Q, mode="chat", tokenizer=make_tokenizer())


# ---------------------------------------------------------------------------------------------
# MCQ accuracy with a rigged model


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_letter_accuracy_forced(mode):
    tok = make_tokenizer(chat=True)
    model = make_model(tok, favour="B")
    got = ev.mcq_accuracy(model, tok, forced_items(), mode=mode, batch_size=3, progress=False)
    assert got["n"] == 8
    assert got["acc"] == 3 / 8  # exactly the share of B among the answers
    assert got["acc_by_subject"] == {"alpha": 2 / 4, "beta": 1 / 4}
    assert got["acc_macro"] == (2 / 4 + 1 / 4) / 2
    model = make_model(tok, favour="D")
    assert ev.mcq_accuracy(model, tok, forced_items(), mode=mode, progress=False)["acc"] == 1 / 8


def test_option_accuracy_forced():
    # The rigged head makes token "B" near-certain and every other token equally unlikely, so the
    # option whose text is "B" wins on log-likelihood per character. It is right in 2 of 5.
    tok = make_tokenizer()
    model = make_model(tok, favour="B")
    options = ["the cat sat", "B", "a dog", "the park"]
    items = {"x": [item(f"q {i}", options, a) for i, a in enumerate("BACBD")]}
    got = ev.mcq_accuracy(model, tok, items, score="option", batch_size=3, progress=False)
    assert got["acc"] == 2 / 5 and got["n"] == 5


def test_kshot_uses_first_dev_items(monkeypatch):
    tok = make_tokenizer()
    model = make_model(tok, favour="B")
    dev = {"alpha": [item(f"Where is the park? {i}", ["here", "there"], "B") for i in range(4)], "beta": SHOTS * 2}
    seen = []
    real = ev.build_mcq_prompt

    def spy(item_, shots, subject, *args):
        seen.append((subject, [s["question"] for s in shots]))
        return real(item_, shots, subject, *args)

    monkeypatch.setattr(ev, "build_mcq_prompt", spy)
    got = ev.mcq_accuracy(model, tok, forced_items(), dev, k_shot=2, progress=False)
    assert got["acc"] == 3 / 8
    assert seen[0] == ("alpha", ["Where is the park? 0", "Where is the park? 1"])
    assert seen[-1] == ("beta", ["Where is the park?", "Where is the cat?"])
    with pytest.raises(UserError, match="k_shot=5 but its dev split has 4 items"):
        ev.mcq_accuracy(model, tok, forced_items(), dev, k_shot=5, progress=False)


def test_letter_scoring_needs_single_tokens():
    tok = make_tokenizer()  # its vocabulary has A-D but no E
    model = make_model(tok)
    items = {"x": [{**item("q", list("abcde"), "A"), "source": "bench/x.jsonl", "line": 7}]}
    with pytest.raises(UserError, match=r"bench/x\.jsonl:7: tokenizer .* cannot encode answer ' E' as one token.*score='option'"):
        ev.mcq_accuracy(model, tok, items, progress=False)
    ev.mcq_accuracy(model, tok, items, score="option", progress=False)  # option scoring copes


def test_mcq_deterministic_and_batch_independent():
    tok = make_tokenizer()
    model = make_model(tok)  # random: whatever it picks must not depend on batching
    items = {"x": [item(f"Where is the cat ? {i}", CHOICES, "ABCD"[i % 4]) for i in range(6)]}
    for score in ("letter", "option"):
        a = ev.mcq_accuracy(model, tok, items, score=score, batch_size=1, progress=False)
        b = ev.mcq_accuracy(model, tok, items, score=score, batch_size=4, progress=False)
        assert a == b


# ---------------------------------------------------------------------------------------------
# Generation


def chat_records():
    return [
        [{"role": "user", "content": "Where is the cat ?"}, {"role": "assistant", "content": "B B B"}],
        {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the cat sat"}]},
        [{"role": "user", "content": "Where is the park ?"}, {"role": "assistant", "content": "B B B"}],
        [{"role": "user", "content": "What sat on the mat ?"}, {"role": "assistant", "content": "here there"}],
    ]


@pytest.mark.parametrize("chat", [True, False])
def test_generation_eval_forced(chat):
    tok = make_tokenizer(chat=chat)
    model = make_model(tok, favour="B")  # greedy output is always "B B B"
    got = ev.generation_eval(model, tok, chat_records(), max_new_tokens=3, batch_size=3, lang="en", n_samples=2, return_predictions=True, progress=False)
    assert got["predictions"] == ["B B B"] * 4
    assert got["n"] == 4
    # two exact matches, two answers sharing no token with "b b b"
    assert got["rouge1"] == got["rouge2"] == got["rougeL"] == pytest.approx(0.5)
    expected = text_metrics(["B B B"] * 4, ["B B B", "the cat sat", "B B B", "here there"], "en")
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert got["samples"] == [
        {"prompt": "Where is the cat ?", "reference": "B B B", "prediction": "B B B"},
        {"prompt": "the dog", "reference": "the cat sat", "prediction": "B B B"},
    ]
    # a model that wants to stop at once answers with nothing
    model = make_model(tok, favour="</s>")
    got = ev.generation_eval(model, tok, chat_records(), max_new_tokens=3, return_predictions=True, progress=False)
    assert got["predictions"] == [""] * 4 and got["rouge1"] == 0.0


def test_generate_greedy_matches_manual_loop():
    tok = make_tokenizer(chat=True)
    model = make_model(tok, seed=1)
    prompts = ["user: where is the park ?\nassistant:", "user: the cat\nassistant:", "user: a dog ran in the park and the cat sat on the mat .\nassistant:"]
    got = ev.generate_greedy(model, tok, prompts, max_new_tokens=4, batch_size=1, templated=True, progress=False)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True).strip()


def test_generation_bad_record():
    tok = make_tokenizer()
    model = make_model(tok)
    with pytest.raises(UserError, match="record 1: the last message must be the reference assistant answer"):
        ev.generation_eval(model, tok, [[{"role": "user", "content": "hi"}]], progress=False)


# ---------------------------------------------------------------------------------------------
# evaluate_model and the command line


def task_files(tmp_path):
    texts = ["the cat sat on the mat .", "a dog ran in the park", "here there"]
    ppl = write(tmp_path / "val.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    mcq = write(tmp_path / "bench" / "x.jsonl", "".join(
        json.dumps({"question": f"q {i}", "A": "a", "B": "b", "C": "c", "D": "d", "answer": a}) + "\n" for i, a in enumerate("BBAC")
    ))
    gen = write(tmp_path / "qa.jsonl", "".join(json.dumps({"messages": m if isinstance(m, list) else m["messages"]}) + "\n" for m in chat_records()))
    return texts, ppl, mcq, gen


def test_evaluate_model(tmp_path):
    texts, ppl, mcq, gen = task_files(tmp_path)
    tok = make_tokenizer(chat=True)
    model = make_model(tok, favour="B")
    tasks = {
        "val": {"type": "ppl", "path": str(ppl), "max_length": 64},
        "bench": {"type": "mcq", "path": str(tmp_path / "bench"), "limit": 3},
        "qa": {"type": "gen", "path": str(gen), "max_new_tokens": 3},
    }
    got = ev.evaluate_model(model, tok, tasks, progress=False)
    assert got["val"] == perplexity(model, tok, texts, max_length=64, progress=False)
    assert got["bench"]["n"] == 3 and got["bench"]["acc"] == pytest.approx(2 / 3)
    assert got["bench"]["score"] == "letter" and got["bench"]["k_shot"] == 0
    assert got["qa"]["n"] == 4 and got["qa"]["rouge1"] == pytest.approx(0.5)
    with pytest.raises(UserError, match="unknown option"):
        ev.evaluate_model(model, tok, {"v": {"type": "ppl", "path": str(ppl), "kshot": 1}}, progress=False)
    with pytest.raises(UserError, match="type must be one of"):
        ev.evaluate_model(model, tok, {"v": {"type": "bleu", "path": str(ppl)}}, progress=False)
    with pytest.raises(UserError, match="no dev split"):
        ev.evaluate_model(model, tok, {"b": {"type": "mcq", "path": str(mcq), "k_shot": 1}}, progress=False)
    with pytest.raises(UserError, match=r"val\.jsonl:1: missing field 'body' \(fields: text\)"):
        ev.evaluate_model(model, tok, {"v": {"type": "ppl", "path": str(ppl), "text_field": "body"}}, progress=False)
    bad = write(tmp_path / "null.jsonl", '{"text": "a real document"}\n{"text": null}\n')
    with pytest.raises(UserError, match=r"null\.jsonl:2: field 'text' is NoneType, not text"):
        ev.read_texts(bad)
    assert ev.read_texts(bad, limit=1) == ["a real document"]


def test_parse_task():
    assert ev.parse_task("law=ppl:data/x.jsonl") == ("law", {"type": "ppl", "path": "data/x.jsonl"})
    assert ev.parse_task("mcq:data/a=b.csv") == ("mcq", {"type": "mcq", "path": "data/a=b.csv"})
    for bad in ("law=ppl", "law=foo:x", "ppl:"):
        with pytest.raises(UserError, match="expected name=type:path"):
            ev.parse_task(bad)


def test_cli(tmp_path):
    texts, ppl, mcq, gen = task_files(tmp_path)
    tok = make_tokenizer(chat=True)
    model = make_model(tok, favour="B")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out" / "eval.json"
    ev.main([
        "--model", str(tmp_path / "model"), "--tasks", f"val=ppl:{ppl}", f"bench=mcq:{mcq}", "--tasks", f"qa=gen:{gen}",
        "--output", str(out), "--max_new_tokens", "3", "--limit", "3", "--dtype", "fp32", "--device", "cpu",
    ])
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"val", "bench", "qa"}
    assert report["results"]["val"]["docs"] == 3 and math.isfinite(report["results"]["val"]["ppl"])
    assert report["results"]["bench"]["n"] == 3
    assert report["results"]["qa"]["n"] == 3
    assert report["tasks"]["bench"] == {"type": "mcq", "path": str(mcq), "batch_size": None, "limit": 3, "k_shot": 0, "mode": "plain", "score": "letter", "max_length": None}
    # the same numbers as the harness called in-process on the model the CLI loaded
    from common.modeling import load_model, load_tokenizer

    loaded = load_model(str(tmp_path / "model"), dtype="fp32", device="cpu")
    expected = ev.evaluate_model(loaded, load_tokenizer(str(tmp_path / "model")), report["tasks"], progress=False)
    assert report["results"] == json.loads(json.dumps(expected))


def test_generation_record_forms():
    assert ev.record_messages({"prompt": "hi", "completion": "there"}) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}
    ]
    assert ev.record_messages({"question": "q", "answer": "a", "_source": "x.jsonl", "_line": 3})[-1] == {"role": "assistant", "content": "a"}
    with pytest.raises(UserError, match="qa.jsonl:4: "):
        ev.record_messages({"body": "no known form"}, "qa.jsonl:4")
