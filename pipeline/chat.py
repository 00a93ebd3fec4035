"""Conversations and prompt–completion pairs → token ids plus a per-token "trained" flag, for `kdcache capture
--format auto|text|chat|prompt-completion --chat-template FILE --train-on assistant|last-assistant|all`.
Pure functions over a transformers tokenizer; no torch.

Record formats (TRL's conventions; `--format auto` resolves each record with `record_format`):
  text               {"text": "..."}  (the --text-field; read and tokenized by pipeline/corpus/, not here)
  chat               {"messages": [{"role": ..., "content": ...}, ...]}
  prompt-completion  {"prompt": str, "completion": str}                      plain: the text is prompt + completion
                     {"prompt": [messages], "completion": [assistant messages]}   conversational
A field whose value is None counts as absent: `datasets` fills the columns a record lacks with None.

Trained tokens (`--train-on`):
  assistant       the tokens of every assistant turn (of a prompt–completion pair: those of the completion)
  last-assistant  only those of the last such turn
  all             every token
An assistant turn's tokens are what the model generates: everything after its header through its end-of-turn
marker (ChatML: "content<|im_end|>", not "<|im_start|>assistant\n" before it nor the "\n" after it). What the
teacher sees is the render of the whole conversation, so the turns are located in that render: the header is the
template's generation prompt (`layout`, found once by rendering a sentinel turn), each message's text is found in
order after the one before, a reply after its header, and its end-of-turn marker (END_MARKERS, or eos) is the first
one after it. So templates that rewrite earlier turns (Qwen3 drops their <think> blocks), append a generation prompt
after every conversation (Llama 3.0) or fold the system prompt into the first user turn (Gemma) mask exactly; a
reply the template drops or rewrites is refused, naming the turn. Templates with `{% generation %}` marks keep
transformers' mask.

Reasoning: a message's `reasoning_content` (Qwen3, DeepSeek-R1) or `thinking` (gpt-oss), or a reply written
"<think>...</think>answer", renders through the template and is trained with its reply (`train_reasoning=False`:
context). Reasoning under a field the template never reads is refused: the teacher would not see it. A
conversation without a trainable assistant turn renders with no trained token (with `all`: every token trained);
the caller counts and skips it.
"""

import functools
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
# The end-of-turn markers templates write after a reply (the model generates them to end its turn), besides eos.
END_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<｜end▁of▁sentence｜>", "</s>", "<|end|>",
               "<|return|>", "<|call|>", "<|endoftext|>", "<|end_of_text|>", "<|END_OF_TURN_TOKEN|>", "<eos>")
# The message fields templates read an assistant's reasoning from: Qwen3 and DeepSeek-R1, gpt-oss.
REASONING = ("reasoning_content", "thinking")
_SENTINEL = "kdcache\u2063sentinel"


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
        for key in ("content", *REASONING):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise KdcacheError(f"{where}: {at}.{key} must be a string, got {type(m[key]).__name__} "
                                   f"{show(m[key])}")
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


@dataclass(frozen=True)
class Layout:
    """What a chat template writes around a reply, found once per (tokenizer, template) by rendering a sentinel:
    `header` the text before a reply (its generation prompt, e.g. "<|im_start|>assistant\n"; "" if the probe
    render fails), `markers` the end-of-turn markers of this tokenizer (END_MARKERS it has, and its eos)."""

    header: str
    markers: tuple[str, ...]


@functools.lru_cache(maxsize=16)
def layout(tokenizer, template: str) -> Layout:
    """The Layout of `template` rendered by `tokenizer`: header = what the render of one user turn with
    add_generation_prompt writes after the user's text and its end-of-turn marker (leading whitespace dropped)."""
    specials = set(tokenizer.get_vocab()) & {*END_MARKERS, *([tokenizer.eos_token] if tokenizer.eos_token else [])}
    markers = tuple(sorted(specials, key=len, reverse=True))
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001  a template that needs more than one user turn: replies located by text only
        return Layout("", markers)
    tail = text[text.find(_SENTINEL) + len(_SENTINEL):].lstrip() if _SENTINEL in text else ""
    marker = next((m for m in markers if tail.startswith(m)), "")
    return Layout(tail[len(marker):].lstrip(), markers)


def _reasoning(message: dict) -> tuple[str | None, str, str]:
    """(the REASONING key the message carries or None, its reasoning text, its reply text). A reply written as
    "<think>...</think>answer" (how Qwen3 and DeepSeek-R1 templates read a content) is split there."""
    for key in REASONING:
        if key in message:
            return key, message[key], message["content"]
    content = message["content"]
    if message["role"] == "assistant" and "</think>" in content:
        thought, answer = content.rsplit("</think>", 1)
        return None, thought.split("<think>")[-1], answer.lstrip("\n")
    return None, "", content


def _find(text: str, piece: str, start: int) -> tuple[int, int] | None:
    """[a, b) of the first occurrence at or after `start` of `piece`, or else of piece.strip() (templates trim
    contents); None if neither is there."""
    for p in dict.fromkeys((piece, piece.strip())):
        at = text.find(p, start)
        if at >= 0:
            return at, at + len(p)
    return None


def _find_reply(text: str, piece: str, start: int, lay: Layout) -> tuple[int, int] | None:
    """Like _find, preferring an occurrence that an end-of-turn marker follows (whitespace aside) before the next
    header: a reply that is also a word of the template's own text ("assistant" in gpt-oss's second header) is
    found where the reply is."""
    first = _find(text, piece, start)
    if first is None or not lay.markers:
        return first
    stop = text.find(lay.header, first[1]) if lay.header else -1
    stop = len(text) if stop < 0 else stop
    for p in dict.fromkeys((piece, piece.strip())):
        at = text.find(p, start)
        while 0 <= at < stop:
            k = at + len(p)
            while k < len(text) and text[k].isspace():
                k += 1
            if any(text.startswith(m, k) for m in lay.markers):
                return at, at + len(p)
            at = text.find(p, at + 1)
    return first


@dataclass(frozen=True)
class _Turn:
    """Where an assistant turn sits in the render (character offsets): `start` the first character after its
    header (None: header not found), `thought` its reasoning's [a, b) (None: not in the render), `reply` its text's
    [a, b), `end` the end of its end-of-turn marker (the reply's end when the template writes none)."""

    start: int | None
    thought: tuple[int, int] | None
    reply: tuple[int, int]
    end: int


def _locate(text: str, messages: list[dict], lay: Layout, where: str, needed: set[int]) -> dict[int, _Turn]:
    """The _Turn of every assistant message found in `text`, the render of the whole conversation. Messages are
    found in order, each after the one before; an assistant reply after the next occurrence of the header. A
    reply's end-of-turn marker is the first marker after it that comes before the next message and the next header.
    KdcacheError for a turn in `needed` that is not there (the template drops or rewrites it)."""
    turns, cursor = {}, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            found = _find(text, m["content"], cursor)
            cursor = found[1] if found else cursor
            continue
        head = text.find(lay.header, cursor) if lay.header else -1
        start = head + len(lay.header) if head >= 0 else None
        _, thought_text, answer = _reasoning(m)
        after = cursor if start is None else start
        bound = text.find(lay.header, after) if lay.header else -1         # a thought belongs before the next turn
        thought = _find(text, thought_text, after) if thought_text.strip() else None
        thought = thought if thought and (bound < 0 or thought[1] <= bound) else None
        reply = _find_reply(text, answer, thought[1] if thought else after, lay)
        if reply is None:
            if i in needed:
                raise KdcacheError(f"{where}: messages[{i}] (assistant) is not in the chat template's render (the "
                                   f"template drops or rewrites it: {show(answer)}), so its tokens cannot be located")
            continue
        end = reply[1]
        nxt = _find(text, messages[i + 1]["content"], end) if i + 1 < len(messages) else None
        limit = nxt[0] if nxt else len(text)
        if lay.header and 0 <= (h := text.find(lay.header, end)) < limit:
            limit = h
        marks = [(at, at + len(mk)) for mk in lay.markers if 0 <= (at := text.find(mk, end, limit))]
        if marks:
            end = min(marks)[1]
        turns[i] = _Turn(start, thought, reply, end)
        cursor = end
    return turns


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


def _check_reasoning(messages: list[dict], template: str, where: str) -> None:
    """KdcacheError for a message carrying reasoning under a field the template never reads: the teacher would
    not see it, so it cannot be trained."""
    for i, m in enumerate(messages):
        key = _reasoning(m)[0]                                    # read as message.KEY or message['KEY']
        if key is not None and not re.search(rf"""(\.|\[\s*['"]){key}\b""", template):
            raise KdcacheError(f"{where}: messages[{i}].{key} is not rendered: the chat template never reads "
                               f"{key!r} (the teacher would not see it); drop the field, or pass a --chat-template "
                               "that renders it")


def render(tokenizer, messages: list[dict], train_on: str, where: str, template: str | None = None,
           first_trained: int = 0, train_reasoning: bool = True) -> tuple[list[int], list[bool]]:
    """Tokens of a validated conversation (`check_messages`) rendered with the chat template (`template`, the
    text of --chat-template, else the tokenizer's), and per token whether it is trained (see the module doc).
    Assistant turns before `first_trained` (a conversational prompt) are context, never trained. Without
    `train_reasoning` a turn's reasoning (and the text between it and the reply) is context too.

    With `{% generation %}` marks the trained tokens are transformers' `return_assistant_tokens_mask`; without,
    each trained turn is located in the render (`_locate`): from its header's end (or its reply, when the header
    is not found) through its end-of-turn marker. A token is trained if its characters overlap a trained span.
    Returns ids (n,) and trained (n,)."""
    if train_on not in TRAIN_ON:
        raise KdcacheError(f"--train-on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    template = resolve_template(tokenizer, template, where)
    _check_reasoning(messages, template, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
    if train_on == "last-assistant":
        turns = turns[-1:]
    text = _apply(tokenizer, messages, template, where, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    if train_on == "all":
        return ids, [True] * len(ids)
    generation = bool(_GENERATION.search(template)) and bool(turns)
    located = {} if generation and not first_trained and train_reasoning else \
        _locate(text, messages, layout(tokenizer, template), where, set() if generation else set(turns))
    if generation:
        out = _apply(tokenizer, messages, template, where, tokenize=True, return_dict=True,
                     return_assistant_tokens_mask=True)
        if list(out["input_ids"]) != ids:
            raise KdcacheError(f"{where}: the chat template renders differently with return_assistant_tokens_mask")
        marked = _runs([bool(m) for m in out["assistant_masks"]])
        if not marked:
            raise KdcacheError(f"{where}: the chat template's {{% generation %}} marks no token of the "
                               "assistant turns")
        spans = [(offsets[a][0], offsets[b - 1][1]) for a, b in marked]
        if first_trained:                                            # the prompt's assistant turns are context
            lo = min((t.start if t.start is not None else t.reply[0] for i, t in located.items()
                      if i >= first_trained), default=len(text))
            spans = [(max(a, lo), b) for a, b in spans if b > lo]
        spans = spans[-1:] if train_on == "last-assistant" else spans
    else:
        spans = []
        for i in turns:
            t = located[i]
            begin = t.start if t.start is not None else (t.thought or t.reply)[0]
            spans.append((begin, t.end))
    untrained = [] if train_reasoning else [(t.start if t.start is not None else t.thought[0], t.reply[0])
                                            for t in located.values() if t.thought is not None]
    trained = [any(a < e and b > s for s, e in spans) and not any(a >= s and b <= e for s, e in untrained)
               for a, b in offsets]
    return ids, trained


def render_pair(tokenizer, prompt: str, completion: str, train_on: str) -> tuple[list[int], list[bool]]:
    """A plain prompt–completion pair: ids = tokens of prompt + completion (as pipeline/corpus/packing.py tokenizes
    a text document), trained = the completion's tokens (every token with train_on "all").

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


def render_example(tokenizer, example: Example, train_on: str, where: str, template: str | None = None,
                   train_reasoning: bool = True) -> tuple[list[int], list[bool]]:
    """`render` for a conversation Example, `render_pair` for a plain prompt–completion one."""
    if example.messages:
        return render(tokenizer, example.messages, train_on, where, template, example.first_trained,
                      train_reasoning)
    return render_pair(tokenizer, example.prompt, example.completion, train_on)
