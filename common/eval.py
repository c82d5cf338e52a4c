"""Evaluation harness shared by every stage, and a command line to run it on any model.

Three kinds of task, all on a model and tokenizer already loaded:

- **mcq** — multiple-choice accuracy on C-Eval / CMMLU / MMLU-style files (`load_mcq`,
  `mcq_accuracy`). Two scorings: `letter` compares the log-likelihood of " A", " B", ... after
  "Answer:" (MMLU's standard; near chance below ~1B parameters), `option` compares each option's
  own text by log-likelihood divided by its length in characters (lm-eval's acc_norm; the
  options are then not listed in the prompt, as lm-eval does for PIQA/ARC/OpenBookQA).
- **ppl** — token-weighted perplexity of a jsonl text file (`ppl_eval`, see
  `common.metrics.perplexity`).
- **gen** — greedy answers to chat records, scored against the reference answer with ROUGE-1/2/L
  and BLEU-4 (`generation_eval`, the SOAEsV2 domain-QA metrics).

`retention` and `domain_gain` turn a before/after pair into the ratio the papers report; every
stage uses these two and nothing else for that maths.

Command line (writes one JSON file; `--tasks` takes `name=type:path`, type one of mcq/ppl/gen):

    python -m common.eval --model models/SmolLM2-135M-Instruct \\
        --tasks piqa=mcq:data/demo/raw/bench/piqa.jsonl law=ppl:runs/demo/01_corpus/val_domain.jsonl \\
        --score option --limit 200 --output runs/demo/eval_base.json

MCQ input: a csv/tsv/jsonl file, or a folder of them, one subject per file. Columns `question`,
`answer` and option columns `A`, `B`, ... (2 to 10 consecutive letters); extra columns (`id`,
`explanation`) are ignored, header names are case-insensitive (CMMLU writes `Question`), and
MMLU's header-less csv (question, A-D, answer) is recognised from its first row. Splits: a
`dev/` / `val/` / `test/` subfolder (MMLU, CMMLU) or a `_dev` / `_val` / `_test` file-name suffix
(C-Eval, MMLU); k-shot examples are the first k items of the same subject's dev split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from common.errors import UserError
from common.data import read_jsonl_numbered
from common.metrics import _progress, input_device, text_metrics, tokenizer_adds_bos
from common.metrics import perplexity as _perplexity
from common.run import atomic_write_json

LETTERS = "ABCDEFGHIJ"
SPLITS = ("dev", "val", "test", "train")
MCQ_EXTS = (".csv", ".tsv", ".jsonl", ".json")

# ---------------------------------------------------------------------------------------------
# Before/after ratios

_HIGHER_BETTER = {"acc", "accuracy", "rouge", "rouge1", "rouge2", "rougeL", "bleu", "bleu4", "higher"}
_LOWER_BETTER = {"ppl", "perplexity", "nll", "loss", "lower"}


def retention(before: float, after: float, kind: str = "acc") -> float:
    """Share of a score kept after training: > 1 means it improved.

    For a higher-is-better score (kind "acc", "rouge1", "bleu4", ... or "higher") it is
    after / before; for a lower-is-better one ("ppl", "nll", "loss" or "lower") before / after,
    so perplexity 20 -> 25 gives 0.8 and 20 -> 16 gives 1.25. A zero or NaN input gives NaN rather
    than an exception, so a long run still writes its manifest.
    """
    if kind in _LOWER_BETTER:
        num, den = before, after
    elif kind in _HIGHER_BETTER:
        num, den = after, before
    else:
        raise ValueError(f"unknown kind {kind!r}: use one of {sorted(_HIGHER_BETTER | _LOWER_BETTER)}")
    num, den = float(num), float(den)
    if den == 0 or math.isnan(num) or math.isnan(den):
        return float("nan")
    return num / den


def domain_gain(before: float, after: float, kind: str = "acc") -> float:
    """Improvement factor on a domain score (SOAEsV2's "Rouge-1 x1.08"): the same maths as `retention`."""
    return retention(before, after, kind)


# ---------------------------------------------------------------------------------------------
# Reading files


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """Yield (line number, object) from a jsonl file, or (item number, object) from a json list."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        for i, obj in enumerate(data, 1):
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{i}: expected an object, got {type(obj).__name__}")
            yield i, obj
        return
    yield from read_jsonl_numbered(path)


def _read_csv(path: Path) -> Iterable[tuple[int, dict]]:
    """Yield (line number, row dict) from a csv/tsv; detects MMLU's header-less layout."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        header = None
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                names = [c.strip().lower() for c in row]
                last = row[-1].strip().upper()
                if "question" not in names and "answer" not in names and len(row) >= 4 and len(last) == 1 and last in LETTERS:
                    # MMLU's original csv: no header, question, options..., answer letter.
                    header = ["question", *LETTERS[: len(row) - 2], "answer"]
                else:
                    header = row
                    continue
            if len(row) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(row)} fields but the header has {len(header)}")
            yield reader.line_num, dict(zip(header, row))


def _parse_mcq_item(raw: dict, path: Path, line: int) -> dict:
    where = f"{path}:{line}"
    by_name: dict[str, str] = {}
    for key in raw:
        name = str(key).strip()
        by_name[name.upper() if len(name) == 1 and name.upper() in LETTERS else name.lower()] = key
    missing = [c for c in ("question", "answer", "A", "B") if c not in by_name]
    if missing:
        columns = ", ".join(str(k) for k in raw)
        raise UserError(f"{where}: missing column {missing[0]!r} (columns: {columns})")
    letters = [L for L in LETTERS if L in by_name]
    expected = LETTERS[: len(letters)]
    if "".join(letters) != expected:
        gap = next(L for L in expected if L not in by_name)
        raise UserError(f"{where}: missing option column {gap!r} (options must be consecutive letters from A; found {', '.join(letters)})")
    choices = ["" if raw[by_name[L]] is None else str(raw[by_name[L]]).strip() for L in letters]
    while len(choices) > 2 and choices[-1] == "":
        choices.pop()  # a file with columns A-E whose question has only four options
    answer = raw[by_name["answer"]]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        answer = LETTERS[answer]  # HF-style integer label
    answer = "" if answer is None else str(answer).strip().upper()
    if answer not in list(LETTERS[: len(choices)]):  # a list: "" is in every string
        raise UserError(f"{where}: answer {answer!r} is not one of {', '.join(LETTERS[: len(choices)])}")
    question = raw[by_name["question"]]
    if question is None:
        raise UserError(f"{where}: empty question")
    return {"question": str(question).strip(), "choices": choices, "answer": answer, "source": str(path), "line": line}


def _rows(path: Path) -> list[tuple[int, dict]]:
    try:
        return list(_read_jsonl(path) if path.suffix in (".jsonl", ".json") else _read_csv(path))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_mcq_file(path: str | os.PathLike) -> list[dict]:
    """Items of one MCQ file: dicts with question, choices (list), answer (letter), source, line."""
    path = Path(path)
    items = [_parse_mcq_item(raw, path, line) for line, raw in _rows(path)]
    if not items:
        raise UserError(f"{path}: no questions (empty subject)")
    return items


def _split_of(path: Path) -> str | None:
    for split in SPLITS:
        if path.stem.endswith("_" + split):
            return split
    return None


def subject_name(path: str | os.PathLike) -> str:
    """Subject of an MCQ file: its name without extension and split suffix (`anatomy_test.csv` -> `anatomy`)."""
    path = Path(path)
    split = _split_of(path)
    return path.stem[: -len(split) - 1] if split else path.stem


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MCQ_EXTS)


def mcq_files(path_or_dir: str | os.PathLike, split: str = "test") -> list[Path]:
    """The files `load_mcq` reads; see there."""
    path = Path(path_or_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    if (path / split).is_dir():
        path = path / split
    files = _data_files(path)
    if any(_split_of(p) for p in files):
        files = [p for p in files if _split_of(p) == split]
    elif any((path / s).is_dir() for s in SPLITS) and path.name not in SPLITS:
        files = []  # split subfolders exist, just not this one
    if not files:
        raise UserError(f"{path}: no {split} question files (.csv, .tsv, .jsonl, .json)")
    return files


def load_mcq(path_or_dir: str | os.PathLike, split: str = "test") -> dict[str, list[dict]]:
    """Read MCQ items grouped by subject: {subject: [item, ...]}.

    `path_or_dir` is one file (any split name; it is one subject) or a folder. In a folder, the
    files of `split` are taken from a `<split>/` subfolder if there is one, else from files named
    `<subject>_<split>.<ext>`; a folder without split names or subfolders is read whole.
    """
    out: dict[str, list[dict]] = {}
    for f in mcq_files(path_or_dir, split):
        subject = subject_name(f)
        if subject in out:
            raise UserError(f"{f}: subject {subject!r} appears in two files")
        out[subject] = read_mcq_file(f)
    return out


def find_dev(path_or_dir: str | os.PathLike) -> dict[str, list[dict]] | None:
    """The dev split next to an MCQ test set, or None when there is none.

    Looks for a `dev/` subfolder or `*_dev.*` files in a folder; for a single file `x_test.csv`,
    for `x_dev.csv` beside it, or for `x_dev.csv` / `x.csv` in a `dev/` folder next to its
    split folder (MMLU `data/test/x_test.csv`, CMMLU `test/x.csv`).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        if path.name in SPLITS:
            path = path.parent
        if (path / "dev").is_dir() or any(_split_of(p) == "dev" for p in _data_files(path)):
            return load_mcq(path, "dev")
        return None
    subject = subject_name(path)
    stems = [path.parent / f"{subject}_dev"]
    if path.parent.name in SPLITS:
        stems += [path.parent.parent / "dev" / f"{subject}_dev", path.parent.parent / "dev" / subject]
    for stem in stems:
        for ext in MCQ_EXTS:
            candidate = stem.with_name(stem.name + ext)
            if candidate.is_file() and candidate.resolve() != path.resolve():
                return {subject: read_mcq_file(candidate)}
    return None


# ---------------------------------------------------------------------------------------------
# Prompts


def _question_block(item: dict, score: str) -> str:
    lines = [item["question"]]
    if score == "letter":
        lines += [f"{L}. {c}" for L, c in zip(LETTERS, item["choices"])]
    lines.append("Answer:")
    return "\n".join(lines)


def _answer_text(item: dict, score: str) -> str:
    return item["answer"] if score == "letter" else item["choices"][LETTERS.index(item["answer"])]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_mcq_prompt(
    item: dict,
    shots: Sequence[dict] = (),
    subject: str = "",
    mode: str = "plain",
    tokenizer=None,
    score: str = "letter",
) -> str:
    """The context an answer is scored after.

    Plain mode, letter scoring (MMLU's format; the header only when a subject is given):

        The following are multiple choice questions (with answers) about <subject>.

        <shot question>
        A. <option>
        B. <option>
        Answer: B

        <question>
        A. <option>
        B. <option>
        Answer:

    Option scoring drops the lettered options and shows shots answered with the option's text.
    Chat mode puts that text in the user turn of the tokenizer's chat template and returns the
    template up to the start of the assistant's answer.
    """
    header = ""
    if subject:
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    shot_text = "".join(f"{_question_block(s, score)} {_answer_text(s, score)}\n\n" for s in shots)
    text = header + shot_text + _question_block(item, score)
    if mode == "plain":
        return text
    if mode != "chat":
        raise ValueError(f"mode must be 'plain' or 'chat', got {mode!r}")
    if tokenizer is None or not has_chat_template(tokenizer):
        raise UserError("mode 'chat' needs a tokenizer with a chat template; use mode 'plain'")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def mcq_continuations(item: dict, mode: str = "plain", score: str = "letter") -> list[str]:
    """The strings scored after the prompt, one per option: " A" (plain) / "A" (chat), or option texts."""
    sep = " " if mode == "plain" else ""  # an assistant turn starts its own text
    if score == "letter":
        return [sep + L for L in LETTERS[: len(item["choices"])]]
    if score == "option":
        return [sep + c for c in item["choices"]]
    raise ValueError(f"score must be 'letter' or 'option', got {score!r}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_continuation(tokenizer, context: str, ctx_ids: list[int], continuation: str) -> list[int]:
    """Token ids of `continuation` as the model sees it after `context` (whose ids are `ctx_ids`).

    Encodes the whole string and keeps what follows the context's tokens; if the tokenizer merged
    across the boundary, the continuation is encoded on its own (lm-eval does the same).
    """
    whole = _encode(tokenizer, context + continuation)
    if len(whole) > len(ctx_ids) and whole[: len(ctx_ids)] == ctx_ids:
        return whole[len(ctx_ids) :]
    return _encode(tokenizer, continuation)


def _default_max_length(model) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else 2048


def _batched_logits(model, sequences: list[list[int]], pad_id: int):
    """Right-padded forward pass; returns the logits tensor (batch, width, vocab)."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    device = input_device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


def mcq_accuracy(
    model,
    tokenizer,
    items_by_subject: dict[str, list[dict]],
    dev_by_subject: dict[str, list[dict]] | None = None,
    k_shot: int = 0,
    mode: str = "plain",
    score: str = "letter",
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy on MCQ items: {"acc" (over all items), "acc_macro" (mean over subjects), "acc_by_subject", "n"}.

    `score="letter"`: one forward pass per question; the prediction is the letter whose token is
    most likely after the prompt (each letter must encode as one distinct token).
    `score="option"`: one sequence per option; the prediction maximizes the option's summed
    log-likelihood divided by its length in characters. Ties go to the earlier option. Contexts
    longer than `max_length` (default: the model's max_position_embeddings) lose their start.
    With k_shot > 0 the prompt opens with MMLU's "The following are ... about <subject>." line
    (the subject is the file name); zero-shot prompts are the bare question.
    """
    import torch

    if k_shot and dev_by_subject is None:
        raise UserError(f"k_shot={k_shot} needs a dev split (dev_by_subject)")
    if mode not in ("plain", "chat"):
        raise ValueError(f"mode must be 'plain' or 'chat', got {mode!r}")
    if score not in ("letter", "option"):
        raise ValueError(f"score must be 'letter' or 'option', got {score!r}")
    max_length = max_length or _default_max_length(model)
    prefix = [tokenizer.bos_token_id] if mode == "plain" and tokenizer_adds_bos(tokenizer) else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # One request per question (letter) or per option (option): (question index, option, ctx, cont).
    questions: list[tuple[str, dict]] = []
    requests: list[tuple[int, int, list[int], list[int]]] = []
    for subject, items in items_by_subject.items():
        shots: list[dict] = []
        if k_shot:
            shots = list(dev_by_subject.get(subject, []))[:k_shot]
            if len(shots) < k_shot:
                raise UserError(f"subject {subject!r}: k_shot={k_shot} but its dev split has {len(shots)} items")
        for item in items:
            q = len(questions)
            questions.append((subject, item))
            context = build_mcq_prompt(item, shots, subject if k_shot else "", mode, tokenizer, score)
            conts = mcq_continuations(item, mode, score)
            ctx_ids = _encode(tokenizer, context)
            cont_ids = [_encode_continuation(tokenizer, context, ctx_ids, c) for c in conts]
            ctx_ids = prefix + ctx_ids
            if score == "letter":
                _check_letters(tokenizer, item, conts, cont_ids)
                requests.append((q, -1, ctx_ids[-max_length:], [ids[0] for ids in cont_ids]))
            else:
                for j, cont in enumerate(cont_ids):
                    if not cont:
                        continue  # an empty option text cannot be scored; it keeps -inf
                    cont = cont[-(max_length - 1) :]
                    requests.append((q, j, ctx_ids[-(max_length - len(cont)) :], cont))

    n_choices = [len(item["choices"]) for _, item in questions]
    scores = [[-math.inf] * n for n in n_choices]
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][2]) + len(requests[i][3])), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _progress(batches, len(batches), f"mcq {score}") if progress else batches:
                reqs = [requests[i] for i in batch]
                if score == "letter":
                    logits = _batched_logits(model, [r[2] for r in reqs], pad_id)
                    for row, (q, _, ctx, letter_ids) in enumerate(reqs):
                        logp = torch.log_softmax(logits[row, len(ctx) - 1].float(), dim=-1)
                        scores[q] = [float(logp[t]) for t in letter_ids]
                else:
                    logits = _batched_logits(model, [r[2] + r[3] for r in reqs], pad_id)
                    for row, (q, j, ctx, cont) in enumerate(reqs):
                        pos = len(ctx)
                        logp = torch.log_softmax(logits[row, pos - 1 : pos - 1 + len(cont)].float(), dim=-1)
                        ll = float(logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum())
                        chars = len(mcq_continuations(questions[q][1], mode, score)[j])
                        scores[q][j] = ll / max(chars, 1)
    finally:
        if was_training:
            model.train()

    correct_by_subject: dict[str, list[int]] = {}
    for (subject, item), s in zip(questions, scores):
        pred = LETTERS[max(range(len(s)), key=lambda j: (s[j], -j))]
        correct_by_subject.setdefault(subject, []).append(int(pred == item["answer"]))
    acc_by_subject = {s: sum(c) / len(c) for s, c in correct_by_subject.items()}
    n = sum(len(c) for c in correct_by_subject.values())
    return {
        "acc": sum(sum(c) for c in correct_by_subject.values()) / n if n else float("nan"),
        "acc_macro": sum(acc_by_subject.values()) / len(acc_by_subject) if acc_by_subject else float("nan"),
        "acc_by_subject": acc_by_subject,
        "n": n,
    }


def _check_letters(tokenizer, item: dict, conts: list[str], encoded: list[list[int]]) -> None:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    where = f"{item.get('source', '?')}:{item.get('line', '?')}"
    unk = tokenizer.unk_token_id
    for cont, ids in zip(conts, encoded):
        if len(ids) != 1 or (unk is not None and ids[0] == unk):
            raise UserError(
                f"{where}: tokenizer {name} cannot encode answer {cont!r} as one token after the prompt "
                f"(got {len(ids)} tokens{', unknown' if ids and ids[0] == unk else ''}); use score='option'"
            )
    if len({ids[0] for ids in encoded}) != len(encoded):
        raise UserError(f"{where}: tokenizer {name} encodes the answer letters {conts} to the same token; use score='option'")


# ---------------------------------------------------------------------------------------------
# Generation


def record_messages(record, where: str = "record") -> list[dict]:
    """Chat messages of an eval record: a message list, or any record form `common.data.to_messages`
    reads (messages, conversations, prompt/completion, instruction/input/output, question/answer)."""
    from common.data import to_messages

    if isinstance(record, list):
        messages = record
    elif isinstance(record, dict):
        try:
            messages = to_messages(record)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    else:
        raise UserError(f"{where}: expected chat messages or a record object, got {type(record).__name__}")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise UserError(f"{where}: messages must be {{'role', 'content'}} objects")
    return messages


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt text, whether it came from the chat template) for messages awaiting an assistant reply.

    Without a chat template: "User: ...\\nAssistant:" lines (system text first).
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        else:
            parts.append(f"{m['role'].capitalize()}: {m['content']}\n")
    return "".join(parts) + "Assistant:", False


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def generate_greedy(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 4, templated: bool | Sequence[bool] = False, progress: bool = True
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding, cut at the first EOS.

    `templated` says whether a prompt already holds its special tokens (chat template); plain
    prompts get the tokenizer's BOS when it adds one.
    """
    import torch
    from transformers import GenerationConfig

    if isinstance(templated, bool):
        templated = [templated] * len(prompts)
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    encoded = [(list() if t else list(bos)) + _encode(tokenizer, p) for p, t in zip(prompts, templated)]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=sorted(eos) or None
    )
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    outputs: list[str] = [""] * len(prompts)
    device = input_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _progress(batches, len(batches), "generate") if progress else batches:
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = encoded[i]
                    ids[row, width - len(seq) :] = torch.tensor(seq)
                    mask[row, width - len(seq) :] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
                for row, i in enumerate(batch):
                    new = out[row, width:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                    outputs[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()
    return outputs


def generation_eval(
    model,
    tokenizer,
    records: Sequence,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    lang: str = "auto",
    n_samples: int = 5,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict:
    """Greedy answers to chat records scored against their final assistant message.

    Each record is a message list (or {"messages": [...]}) ending with the reference assistant
    answer; the messages before it are the prompt, rendered with the chat template when the
    tokenizer has one. Returns rouge1/rouge2/rougeL (0..1), bleu4 (0..100), n, and `samples`:
    the first `n_samples` (prompt, reference, prediction) triples.
    """
    prompts, templated, refs, questions = [], [], [], []
    for i, record in enumerate(records):
        where = f"{record.get('_source', 'record')}:{record.get('_line', i + 1)}" if isinstance(record, dict) else f"record {i + 1}"
        messages = record_messages(record, where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the reference assistant answer after a prompt")
        text, is_chat = chat_prompt(tokenizer, messages[:-1])
        prompts.append(text)
        templated.append(is_chat)
        refs.append(str(messages[-1]["content"]))
        questions.append(str(messages[-2]["content"]))
    if not prompts:
        raise UserError("generation eval: no records")
    preds = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, templated, progress)
    result = text_metrics(preds, refs, lang)
    result["n"] = len(preds)
    result["samples"] = [
        {"prompt": q, "reference": r, "prediction": p} for q, r, p in list(zip(questions, refs, preds))[:n_samples]
    ]
    if return_predictions:
        result["predictions"] = preds
    return result


# ---------------------------------------------------------------------------------------------
# Perplexity of a file


def _first_rows(path: str | os.PathLike, limit: int | None) -> list[tuple[int, dict]]:
    """(line, object) for the first `limit` records of a jsonl / json-list file (all when None)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return _rows(path)[:limit]


def read_texts(path: str | os.PathLike, text_field: str = "text", limit: int | None = None) -> list[str]:
    """The `text_field` of each record of a jsonl (or json list) file."""
    texts = []
    for line, obj in _first_rows(path, limit):
        if text_field not in obj:
            raise UserError(f"{path}:{line}: missing field {text_field!r} (fields: {', '.join(obj)})")
        if not isinstance(obj[text_field], str):
            # str() would score "None" or "123" as if it were the document.
            raise UserError(f"{path}:{line}: field {text_field!r} is {type(obj[text_field]).__name__}, not text")
        texts.append(obj[text_field])
    return texts


def ppl_eval(
    model,
    tokenizer,
    path: str | os.PathLike,
    text_field: str = "text",
    max_length: int = 1024,
    batch_size: int = 4,
    stride: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """`common.metrics.perplexity` of the texts in a jsonl file: {"ppl", "nll", "tokens", "docs"}."""
    texts = read_texts(path, text_field, limit)
    if not texts:
        raise UserError(f"{path}: no texts")
    return _perplexity(model, tokenizer, texts, max_length=max_length, batch_size=batch_size, stride=stride, progress=progress)


def read_gen_records(path: str | os.PathLike, limit: int | None = None) -> list:
    return [{**obj, "_source": str(path), "_line": line} for line, obj in _first_rows(path, limit)]


# ---------------------------------------------------------------------------------------------
# Several tasks at once

_TASK_KEYS = {
    "ppl": {"path", "text_field", "max_length", "batch_size", "stride", "limit"},
    "mcq": {"path", "split", "dev_path", "k_shot", "mode", "score", "batch_size", "max_length", "limit"},
    "gen": {"path", "max_new_tokens", "batch_size", "lang", "limit", "n_samples", "return_predictions"},
}


def evaluate_model(model, tokenizer, tasks: dict[str, dict], progress: bool = True) -> dict:
    """Run named tasks: {name: {"type": "ppl"|"mcq"|"gen", "path": ..., options}} -> {name: result}.

    ppl: text_field="text", max_length=1024, batch_size=4, stride=None, limit=None (first N texts).
    mcq: split="test", dev_path=None (default: the dev split found beside `path`), k_shot=0,
         mode="plain", score="letter", batch_size=8, max_length=None, limit=None (first N per subject).
    gen: max_new_tokens=128, batch_size=4, lang="auto", limit=None, n_samples=5.
    """
    results = {}
    for name, spec in tasks.items():
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in _TASK_KEYS:
            raise UserError(f"task {name!r}: type must be one of {', '.join(_TASK_KEYS)}, got {kind!r}")
        unknown = set(spec) - _TASK_KEYS[kind]
        if unknown:
            raise UserError(f"task {name!r}: unknown option(s) {', '.join(sorted(unknown))} for type {kind}")
        if "path" not in spec:
            raise UserError(f"task {name!r}: missing 'path'")
        spec = {k: v for k, v in spec.items() if v is not None}
        if kind == "ppl":
            results[name] = ppl_eval(model, tokenizer, progress=progress, **spec)
        elif kind == "gen":
            limit = spec.pop("limit", None)
            records = read_gen_records(spec.pop("path"), limit)
            results[name] = generation_eval(model, tokenizer, records, progress=progress, **spec)
        else:
            results[name] = _run_mcq(model, tokenizer, spec, progress)
    return results


def _run_mcq(model, tokenizer, spec: dict, progress: bool) -> dict:
    limit = spec.pop("limit", None)
    path = spec.pop("path")
    items = load_mcq(path, spec.pop("split", "test"))
    k_shot = spec.get("k_shot", 0)
    dev = None
    dev_path = spec.pop("dev_path", None)
    if k_shot:
        dev = load_mcq(dev_path, "dev") if dev_path else find_dev(path)
        if dev is None:
            raise UserError(f"{path}: k_shot={k_shot} but no dev split found beside it; give dev_path")
    if limit is not None:
        items = {s: v[:limit] for s, v in items.items()}
    result = mcq_accuracy(model, tokenizer, items, dev, progress=progress, **spec)
    result.update(k_shot=k_shot, mode=spec.get("mode", "plain"), score=spec.get("score", "letter"))
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def parse_task(text: str) -> tuple[str, dict]:
    """`name=type:path` (or `type:path`, named after its type) -> (name, {"type", "path"})."""
    name, _, rest = text.partition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
    kind, sep, path = rest.partition(":")
    if not sep or kind not in _TASK_KEYS or not path:
        raise UserError(f"--tasks {text!r}: expected name=type:path with type one of {', '.join(_TASK_KEYS)}")
    return name or kind, {"type": kind, "path": path}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.eval", description="Evaluate a model on mcq/ppl/gen tasks; write JSON.")
    p.add_argument("--model", required=True, help="model folder (transformers format)")
    p.add_argument("--tasks", nargs="+", action="extend", required=True, help="name=type:path, type one of mcq, ppl, gen")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--k_shot", type=int, default=0, help="mcq: examples from the dev split of each subject")
    p.add_argument("--mode", choices=["plain", "chat"], default="plain", help="mcq: plain text or chat template")
    p.add_argument("--score", choices=["letter", "option"], default="letter", help="mcq: score the letter or the option text (acc_norm)")
    p.add_argument("--batch_size", type=int, default=None, help="default: mcq 8, ppl 4, gen 4")
    p.add_argument("--max_new_tokens", type=int, default=128, help="gen: tokens generated per answer")
    p.add_argument("--max_length", type=int, default=None, help="ppl: window length (default 1024); mcq: context cap")
    p.add_argument("--limit", type=int, default=None, help="first N texts/records (ppl, gen) or N questions per subject (mcq)")
    p.add_argument("--text_field", default="text", help="ppl: field holding the text")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def tasks_from_args(args) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    for text in args.tasks:
        name, spec = parse_task(text)
        if name in tasks:
            raise UserError(f"--tasks: task name {name!r} given twice")
        kind = spec["type"]
        spec.update(batch_size=args.batch_size, limit=args.limit)
        if kind == "ppl":
            spec.update(text_field=args.text_field, max_length=args.max_length)
        elif kind == "mcq":
            spec.update(k_shot=args.k_shot, mode=args.mode, score=args.score, max_length=args.max_length)
        else:
            spec.update(max_new_tokens=args.max_new_tokens)
        tasks[name] = spec
    return tasks


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = tasks_from_args(args)
    from common.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device)
    results = evaluate_model(model, tokenizer, tasks)
    report = {"model": str(args.model), "tasks": tasks, "results": results}
    atomic_write_json(args.output, report)
    summary = {name: {k: v for k, v in r.items() if k not in ("samples", "predictions", "acc_by_subject")} for name, r in results.items()}
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
