"""Chat and instruction data: records -> rendered conversations -> tokens with a loss mask.

A chat / instruction JSONL holds one conversation per line, in either schema:

    {"prompt": "...", "response": "..."}                       (instruction data)
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

An instruction record is the conversation [user: prompt, assistant: response]. Every
conversation needs at least one assistant turn (what is trained); a record of neither schema,
an unknown role or a non-string content is refused with its file and line.

Rendering: the tokenizer's chat template (`chat_template` in its `tokenizer_config.json`, run
by a sandboxed jinja2 environment with `messages`, `bos_token`, `eos_token`,
`add_generation_prompt`) when it has one, else the plain template

    ### System:\\n{content}        ### User:\\n{content}        ### Assistant:\\n{content}{EOS}

turns joined by a blank line ("\\n\\n"), so an assistant turn adds exactly its content and EOS

(`data.chat_template`: "auto" picks the tokenizer's if any, "plain" forces the plain one).
Only the assistant turns are trained: a token is trained when it starts inside the text an
assistant turn adds to the rendering (its content and what the template writes after it, such
as the end-of-turn token, so the model learns to stop); system and user turns and the
template's headers are context only. The spans come from rendering growing prefixes of the
conversation, which must extend one another (true of ordinary templates; otherwise an error).

Rows: a conversation of tokens x (with BOS first when the tokenizer has one and the rendering
does not start with it) gives (input, target) pairs x[j] -> x[j + 1], trained where x[j + 1]
is; conversations are packed into `seq_len` rows exactly like documents (packing.py: segment
ids, positions restarting per conversation; one longer than a row continues in the next).
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sparse_llama.data.packing import Pieces, Windows, document_pieces
from sparse_llama.data.sources import fingerprint, unit_hash
from sparse_llama.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATES = ("auto", "plain")
_PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n",
                  "assistant": "### Assistant:\n"}

Message = dict[str, str]
Renderer = Callable[[Sequence[Message], bool], str]  # (messages, add_generation_prompt) -> text


def conversation(record, where: str = "record") -> list[Message]:
    """The messages of one record of either schema, validated (ValueError naming `where`)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}}")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError(f"{where}: a chat record needs 'messages' (a list of {{'role', "
                         "'content'}}) or both 'prompt' and 'response'; this one has "
                         f"{sorted(record)}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise ValueError(f"{where}: message {k} must be {{'role': one of {list(ROLES)}, "
                             f"'content': a string}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing in it "
                         "would be trained; add the assistant's reply or drop the record")
    return out


def is_chat_record(record) -> bool:
    """Whether a parsed JSON line looks like chat / instruction data (either schema)."""
    return isinstance(record, dict) and (
        "messages" in record or ("prompt" in record and "response" in record))


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"no documents found in {path}: the path does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json")
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"no documents found in {path}: the folder has no .jsonl files")
    return files


def _first_record(file: Path):
    with open(file, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None
    return None


def is_chat_jsonl(path: str | os.PathLike) -> bool:
    """Whether a JSONL file (or the first file of a folder) holds chat records, judged by its
    first non-empty line."""
    try:
        files = _jsonl_files(Path(path))
    except ValueError:
        return False
    return is_chat_record(_first_record(files[0]))


@dataclasses.dataclass(frozen=True)
class Conversations:
    """The validated conversations of a chat JSONL, with stable ids ("file:line")."""

    path: str
    messages: Sequence[list[Message]]
    ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.messages)


def read_chat_jsonl(path: str | os.PathLike) -> Conversations:
    """Every conversation of a chat JSONL file or folder; the first bad record raises."""
    root = Path(path)
    messages, ids = [], []
    for file in _jsonl_files(root):
        name = file.name if root.is_file() else file.relative_to(root).as_posix()
        with open(file, "rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{file}:{line}: invalid JSON: {e}") from e
                messages.append(conversation(record, f"{file}:{line}"))
                ids.append(f"{name}:{line}")
    if not messages:
        raise ValueError(f"no documents found in {path}: no chat records")
    return Conversations(str(path), messages, ids)


def plain_renderer(eos_token: str) -> Renderer:
    """The plain template of the module docstring."""
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        parts = []
        for m in messages:
            end = eos_token if m["role"] == "assistant" else ""
            parts.append(f"{_PLAIN_HEADERS[m['role']]}{m['content']}{end}")
        if add_generation_prompt:
            parts.append(_PLAIN_HEADERS["assistant"])
        return "\n\n".join(parts)
    return render


def _raise(message: str):
    raise ValueError(f"the chat template refused the conversation: {message}")


def jinja_renderer(template: str, *, bos_token: str, eos_token: str) -> Renderer:
    """A Hugging Face chat template, run in jinja2's immutable sandbox (no file or attribute
    access beyond the template's own data)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ValueError("the tokenizer has a chat template but jinja2 is not installed; "
                         "pip install jinja2, or set data.chat_template=plain") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat template does not parse: {e}") from e

    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=list(messages), bos_token=bos_token,
                                   eos_token=eos_token,
                                   add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat template failed: {e}") from e
    return render


def template_of(tokenizer_dir: str | os.PathLike | None) -> str | None:
    """The `chat_template` of a tokenizer directory's tokenizer_config.json, or None."""
    if tokenizer_dir is None:
        return None
    file = Path(tokenizer_dir) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        template = json.loads(file.read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def renderer_for(tokenizer: Tokenizer, tokenizer_dir: str | os.PathLike | None,
                 choice: str = "auto") -> Renderer:
    """The tokenizer's chat template (choice "auto", when it has one) or the plain one."""
    if choice not in CHAT_TEMPLATES:
        raise ValueError(f"data.chat_template must be one of {CHAT_TEMPLATES}, got {choice!r}")
    eos = tokenizer.token(tokenizer.eos_id) or ""
    template = template_of(tokenizer_dir) if choice == "auto" else None
    if template is None:
        return plain_renderer(eos)
    return jinja_renderer(template, bos_token=tokenizer.token(tokenizer.bos_id) or "",
                          eos_token=eos)


def assistant_spans(messages: Sequence[Message], render: Renderer
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans its assistant turns add)."""
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[:i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError("the chat template does not render a conversation as the "
                             "extension of its beginning, so assistant tokens cannot be told "
                             "apart; set data.chat_template=plain")
        spans.append((len(before), len(after)))
    return text, spans


def tokenize_conversation(messages: Sequence[Message], render: Renderer, tokenizer: Tokenizer,
                          *, add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(token ids x (n,) int64, trained (n,) bool): x is the rendered conversation, with BOS
    first when asked for and not already rendered; `trained` marks tokens that start inside
    an assistant span (BOS never is)."""
    text, spans = assistant_spans(messages, render)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int64)
    starts = np.asarray([s for s, _ in encoding.offsets], np.int64)
    trained = np.zeros(len(ids), bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    if add_bos and tokenizer.bos_id is not None and (not len(ids) or ids[0] != tokenizer.bos_id):
        ids = np.concatenate([[tokenizer.bos_id], ids])
        trained = np.concatenate([[False], trained])
    return ids, trained


@dataclasses.dataclass(frozen=True)
class ChatStream:
    """Conversations tokenized and concatenated: conversation d is
    tokens[bounds[d]:bounds[d + 1]], `trained` alongside, `id_hash` for the held-out split."""

    tokens: np.ndarray  # (n,) int64
    trained: np.ndarray  # (n,) bool
    bounds: np.ndarray  # (D + 1,) int64
    id_hash: np.ndarray  # (D,) float64

    @property
    def num_documents(self) -> int:
        return len(self.bounds) - 1


def tokenize_conversations(convs: Conversations, render: Renderer, tokenizer: Tokenizer, *,
                           add_bos: bool = True) -> ChatStream:
    """Every conversation of `convs`, tokenized (in memory; chat sets are small)."""
    parts = [tokenize_conversation(m, render, tokenizer, add_bos=add_bos)
             for m in convs.messages]
    bounds = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(ids) for ids, _ in parts], out=bounds[1:])
    return ChatStream(np.concatenate([ids for ids, _ in parts]),
                      np.concatenate([t for _, t in parts]), bounds,
                      np.asarray([unit_hash(i) for i in convs.ids], np.float64))


class ChatWindows(Windows):
    """`Windows` of a chat stream whose loss_mask is 1 only where the target is trained (an
    assistant token); inputs, targets, segment ids and positions are Windows' own."""

    def __init__(self, stream: ChatStream, pieces: Pieces, seq_len: int):
        super().__init__(stream.tokens, pieces, seq_len)
        self._trained = stream.trained

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        row = super().__getitem__(k)
        first = int(k) * self._seq_len
        n = min(self._seq_len, self._total - first)
        pair = first + self._arange[:n]
        piece = np.searchsorted(self._ends, pair, side="right")
        src = self._starts[piece] + (pair - (self._ends[piece] - self._lengths[piece]))
        row["loss_mask"][:n] = self._trained[src + 1]
        return row


def chat_rows(token_lists: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int
              ) -> list[dict[str, np.ndarray]]:
    """All rows of tokenized conversations `(ids, trained)`, packed in order: for small data
    and tests (the pipeline reads ChatWindows by index)."""
    bounds = np.zeros(len(token_lists) + 1, np.int64)
    np.cumsum([len(ids) for ids, _ in token_lists], out=bounds[1:])
    stream = ChatStream(np.concatenate([ids for ids, _ in token_lists]),
                        np.concatenate([t for _, t in token_lists]), bounds,
                        np.zeros(len(token_lists)))
    windows = ChatWindows(stream, document_pieces(bounds), seq_len)
    return [windows[k] for k in range(len(windows))]


_STREAMS: dict[tuple, ChatStream] = {}  # one tokenization per file state, tokenizer, template


def chat_stream(path: str | os.PathLike, tokenizer: Tokenizer,
                tokenizer_dir: str | os.PathLike | None = None, *, chat_template: str = "auto",
                add_bos: bool = True) -> ChatStream:
    """A chat JSONL's conversations, tokenized once per process (memoised on the files'
    sizes and times, the tokenizer and the template)."""
    render = renderer_for(tokenizer, tokenizer_dir, chat_template)
    template = template_of(tokenizer_dir) if chat_template == "auto" else None
    key = (os.path.abspath(path), json.dumps(fingerprint(path)), tokenizer.fingerprint,
           chat_template, template, add_bos)
    if key not in _STREAMS:
        _STREAMS[key] = tokenize_conversations(read_chat_jsonl(path), render, tokenizer,
                                               add_bos=add_bos)
    return _STREAMS[key]


def windows(stream, pieces: Pieces, seq_len: int) -> Windows:
    """The rows of `pieces` of a token stream: ChatWindows (assistant-only loss) for a
    ChatStream, plain Windows for any other (data/tokens.py) stream."""
    if isinstance(stream, ChatStream):
        return ChatWindows(stream, pieces, seq_len)
    return Windows(stream.tokens, pieces, seq_len)
