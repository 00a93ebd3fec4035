"""Conversations and prompt–completion pairs → token ids plus a per-token "trained" flag, for `kdcache capture
--format auto|text|chat|prompt-completion --chat-template FILE --train-on assistant|last-assistant|all`.
Pure functions over a transformers tokenizer; no torch.

Record formats (TRL's conventions; `--format auto` resolves each record with `record_format`):
  text               {"text": "..."}  (the --text-field; read and tokenized by corpus.py, not here)
  chat               {"messages": [{"role": ..., "content": ...}, ...]}
  prompt-completion  {"prompt": str, "completion": str}                      plain: the text is prompt + completion
                     {"prompt": [messages], "completion": [assistant messages]}   conversational
A field whose value is None counts as absent: `datasets` fills the columns a record lacks with None.

Trained tokens (`--train-on`):
  assistant       the tokens of every assistant turn (of a prompt–completion pair: those of the completion)
  last-assistant  only those of the last such turn
  all             every token
An assistant turn's tokens are what the model generates: its content and its end-of-turn marker (ChatML:
"content<|im_end|>"), not the header before it ("<|im_start|>assistant\\n"). They come from the template's
`{% generation %}` marks when it has them, else from prefix renders (`_turn_span`); a template that allows
neither is refused, never silently trained on everything. A conversation without a trainable assistant turn
renders with no trained token (with `all`: every token trained); the caller counts and skips it.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cache_format import KdcacheError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "text", "chat", "prompt-completion")
TRAIN_ON = ("assistant", "last-assistant", "all")
# The tag transformers' AssistantTracker recognises (utils/chat_template_utils.py, same regex).
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Example:
    """One record ready to render: a conversation (`messages`; its assistant turns from index `first_trained` on
    are the trainable ones) or, when `messages` is empty, a plain prompt–completion pair of strings."""

    messages: list[dict] = field(default_factory=list)
    first_trained: int = 0
    prompt: str = ""
    completion: str = ""


def _present(record: dict, key: str) -> bool:
    return record.get(key) is not None


def show(value, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def record_format(record: dict, text_field: str, where: str) -> str:
    """`--format auto` for one record: "chat" if it has `messages`, "prompt-completion" if it has `prompt` and
    `completion`, "text" if it has `text_field`; KdcacheError naming `where` otherwise."""
    if _present(record, "messages"):
        return "chat"
    if _present(record, "prompt") and _present(record, "completion"):
        return "prompt-completion"
    if _present(record, text_field):
        return "text"
    if _present(record, "prompt") or _present(record, "completion"):
        has, lacks = ("prompt", "completion") if _present(record, "prompt") else ("completion", "prompt")
        raise KdcacheError(f"{where}: has {has!r} but no {lacks!r} (a prompt-completion record needs both)")
    fields = sorted(k for k, v in record.items() if v is not None)
    raise KdcacheError(f"{where}: no field {text_field!r} (fields: {', '.join(fields) or 'none'}); choose one with "
                       "--text-field, or give 'messages' or 'prompt' + 'completion'")


def check_messages(messages, where: str, name: str = "messages") -> list[dict]:
    """TRL-style messages validated: a non-empty list of {"role", "content"} dicts, role one of ROLES, content a
    string. Returns copies without None-valued keys (`datasets` adds them for keys other messages have). Every
    failure is a one-line KdcacheError naming `where` and the field, e.g. "messages[2].role 'bot' is not ..."."""
    if not isinstance(messages, list) or not messages:
        raise KdcacheError(f"{where}: {name} must be a non-empty list of {{role, content}} messages, "
                           f"got {show(messages)}")
    out = []
    for i, m in enumerate(messages):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise KdcacheError(f"{where}: {at} must be a {{role, content}} object, got {show(m)}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise KdcacheError(f"{where}: {at} has no {key!r}")
        if m["role"] not in ROLES:
            raise KdcacheError(f"{where}: {at}.role {show(m['role'])} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise KdcacheError(f"{where}: {at}.content must be a string, got {type(m['content']).__name__} "
                               f"{show(m['content'])}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def to_messages(record: dict, fmt: str, where: str) -> Example:
    """The Example of a "chat" or "prompt-completion" record (a resolved format, see `record_format`).

    Prompt-completion: two strings make a plain pair (no template; `render_pair`); two message lists make a
    conversation `prompt + completion` whose trainable turns are the completion's (all assistant turns, TRL)."""
    if fmt == "chat":
        if not _present(record, "messages"):
            raise KdcacheError(f"{where}: no 'messages' field (--format chat)")
        return Example(messages=check_messages(record["messages"], where))
    if fmt != "prompt-completion":
        raise ValueError(f"to_messages: {fmt!r} is not a conversation format")
    for key in ("prompt", "completion"):
        if not _present(record, key):
            raise KdcacheError(f"{where}: no {key!r} field (--format prompt-completion)")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        p, c = check_messages(prompt, where, "prompt"), check_messages(completion, where, "completion")
        for i, m in enumerate(c):
            if m["role"] != "assistant":
                raise KdcacheError(f"{where}: completion[{i}].role {m['role']!r} must be 'assistant'")
        return Example(messages=p + c, first_trained=len(p))
    raise KdcacheError(f"{where}: prompt and completion must both be strings or both be message lists, got "
                       f"{type(prompt).__name__} and {type(completion).__name__}")


def load_template(path: str) -> str:
    """The Jinja text of `--chat-template FILE`: a template file, or a JSON file with a "chat_template" string
    (chat_template.json, tokenizer_config.json)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdcacheError(f"--chat-template {path}: cannot read: {_one_line(e)}") from e
    if path.endswith(".json"):
        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise KdcacheError(f"--chat-template {path}: not a JSON object: {_one_line(e)}") from e
        if not isinstance(text, str):
            raise KdcacheError(f"--chat-template {path}: no 'chat_template' string")
    if not text.strip():
        raise KdcacheError(f"--chat-template {path}: empty template")
    return text


def resolve_template(tokenizer, template: str | None, where: str) -> str:
    """The Jinja text used: `template` (from --chat-template) if given, else the tokenizer's (its "default" one
    when it has several). This is the text to fingerprint in the manifest."""
    if template is not None:
        return template
    tpl = tokenizer.chat_template
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    if not tpl:
        name = getattr(tokenizer, "name_or_path", "")
        raise KdcacheError(f"{where}: the tokenizer{f' {name}' if name else ''} has no chat template; "
                           "pass --chat-template FILE")
    return tpl


def template_fingerprint(template: str) -> str:
    """sha256 hex of the template's UTF-8 text, for the manifest."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _tokenize(tokenizer, text: str) -> list[int]:
    """Tokens of rendered text, exactly as `apply_chat_template(tokenize=True)` makes them (no added specials)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _apply(tokenizer, messages: list[dict], template: str, where: str, **kwargs):
    """tokenizer.apply_chat_template; any failure of the (user-supplied) template → one-line KdcacheError."""
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, **kwargs)
    except Exception as e:  # noqa: BLE001  Jinja, the sandbox and template filters raise anything
        raise KdcacheError(f"{where}: the chat template failed on turns 0..{len(messages) - 1}: "
                           f"{_one_line(e)}") from e


def _render_ids(tokenizer, messages: list[dict], template: str, where: str, gen_prompt: bool = False) -> list[int]:
    return _tokenize(tokenizer, _apply(tokenizer, messages, template, where, tokenize=False,
                                       add_generation_prompt=gen_prompt))


def _unstable(tokenizer, where: str, turn: int, what: str, a: list[int], b: list[int]) -> KdcacheError:
    """The prefix-stability error; shows the first differing tokens of a (the shorter render) and b."""
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return KdcacheError(f"{where}: chat template is not prefix-stable at turn {turn}: {what} (token {i}: "
                        f"{tokenizer.decode(a[i:i + 4])!r} vs {tokenizer.decode(b[i:i + 4])!r}); use a template "
                        "with {% generation %} marks (--chat-template FILE)")


def _head(tokenizer, messages: list[dict], turn: int, ids: list[int], template: str, where: str) -> int:
    """Number of tokens before assistant turn `turn`: the render of messages[:turn] with the generation prompt,
    which must be a token-prefix of `ids` (the render through or past that turn)."""
    if turn == 0:
        raise KdcacheError(f"{where}: messages[0] is an assistant turn; without {{% generation %}} marks its "
                           "tokens cannot be told from the template's (start with a system or user turn)")
    head = _render_ids(tokenizer, messages[:turn], template, where, gen_prompt=True)
    if ids[:len(head)] != head:
        raise _unstable(tokenizer, where, turn, "the render before it (with add_generation_prompt) is not a "
                        "token-prefix of the render through it", head, ids)
    return len(head)


def _turn_span(tokenizer, messages: list[dict], turn: int, ids: list[int], template: str,
               where: str) -> tuple[int, int]:
    """[start, end) in `ids` (the whole conversation's tokens) of assistant turn `turn`, by prefix renders:
    head = render(messages[:turn], add_generation_prompt=True) and through = render(messages[:turn + 1]); head
    must be a token-prefix of through and through of `ids`; the turn is through[len(head):] less trailing
    whitespace-only tokens (ChatML's "\\n" after "<|im_end|>": written by the template, never generated)."""
    through = _render_ids(tokenizer, messages[:turn + 1], template, where)
    start = _head(tokenizer, messages, turn, through, template, where)
    if ids[:len(through)] != through:
        raise _unstable(tokenizer, where, turn, "its render is not a token-prefix of the whole conversation's",
                        through, ids)
    end = len(through)
    while end > start and not tokenizer.decode(through[end - 1:end]).strip():
        end -= 1
    return start, end


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def render(tokenizer, messages: list[dict], train_on: str, where: str, template: str | None = None,
           first_trained: int = 0) -> tuple[list[int], list[bool]]:
    """Tokens of a validated conversation (`check_messages`) rendered with the chat template (`template`, the
    text of --chat-template, else the tokenizer's), and per token whether it is trained (see the module doc).
    Assistant turns before `first_trained` (a conversational prompt) are context, never trained.

    With `{% generation %}` marks the mask is transformers' `return_assistant_tokens_mask`; its last run is the
    last assistant turn. Without, each trained turn is located by prefix renders (`_turn_span`), and a template
    that is not prefix-stable there is refused. Returns ids (n,) and trained (n,)."""
    if train_on not in TRAIN_ON:
        raise KdcacheError(f"--train-on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    template = resolve_template(tokenizer, template, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
    if train_on == "last-assistant":
        turns = turns[-1:]
    if _GENERATION.search(template) and turns and train_on != "all":
        out = _apply(tokenizer, messages, template, where, tokenize=True, return_dict=True,
                     return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        lo = _head(tokenizer, messages, first_trained, ids, template, where) if first_trained else 0
        spans = [(max(s, lo), e) for s, e in _runs(mask) if e > lo]
        if not spans:
            raise KdcacheError(f"{where}: the chat template's {{% generation %}} marks no token of the "
                               "assistant turns")
        spans = spans[-1:] if train_on == "last-assistant" else spans
    else:
        ids = _render_ids(tokenizer, messages, template, where)
        if train_on == "all":
            return ids, [True] * len(ids)
        spans = [_turn_span(tokenizer, messages, i, ids, template, where) for i in turns]
    trained = [False] * len(ids)
    for s, e in spans:
        trained[s:e] = [True] * (e - s)
    return ids, trained


def render_pair(tokenizer, prompt: str, completion: str, train_on: str) -> tuple[list[int], list[bool]]:
    """A plain prompt–completion pair: ids = tokens of prompt + completion (as corpus.py tokenizes a text
    document), trained = the completion's tokens (every token with train_on "all").

    The split is the longest common token-prefix of tokenize(prompt) and tokenize(prompt + completion): all of
    the prompt's tokens when the tokenizer does not merge across the boundary; when it does, the merged token
    (which holds completion text) is trained. So ids are always the tokenization of the text the teacher and
    student see, and no completion character is left untrained."""
    if train_on not in TRAIN_ON:
        raise KdcacheError(f"--train-on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    ids = _tokenize(tokenizer, prompt + completion)
    if train_on == "all":
        return ids, [True] * len(ids)
    head = _tokenize(tokenizer, prompt)
    k = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
    return ids, [False] * k + [True] * (len(ids) - k)


def render_example(tokenizer, example: Example, train_on: str, where: str,
                   template: str | None = None) -> tuple[list[int], list[bool]]:
    """`render` for a conversation Example, `render_pair` for a plain prompt–completion one."""
    if example.messages:
        return render(tokenizer, example.messages, train_on, where, template, example.first_trained)
    return render_pair(tokenizer, example.prompt, example.completion, train_on)
