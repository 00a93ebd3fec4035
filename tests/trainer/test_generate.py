"""kdcache eval --generate: last replies of a chat cache, greedy decoding, ROUGE-L, and the CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_format import (DomainInfo, KdcacheError, Manifest, ShardWriter, SplitRule, TeacherInfo, TokenizerInfo,
                          TopkV1, open_cache, tokenizer_fingerprint, write_manifest)
from pipeline.cli import cli
from tests.toy import domain_texts
from trainer.generate import generate_replies, generation_report, last_replies, rouge_l, sample_next

K = 4


def doc(*segments: tuple[list[int], bool]) -> tuple[list[int], list[bool]]:
    """A document from (ids, trained) segments: its ids and per token whether it is a trained (reply) token."""
    return [i for ids, _ in segments for i in ids], [t for ids, t in segments for _ in ids]


def write_chat_cache(cache_dir: Path, rows: dict[str, list[list[tuple]]], T: int, tokenizer_info: TokenizerInfo,
                     packing: str = "isolated", split: str = "val", seed: int = 0) -> Path:
    """A cache whose rows are the given documents (filled up to T with an untrained document); position t is
    supervised when token t+1 of its document is trained (random sorted top-K there, -inf elsewhere)."""
    rng = np.random.default_rng(seed)
    V, eos = tokenizer_info.vocab_size, tokenizer_info.eos_id
    codec, domains = TopkV1(top_k=K), {}
    for domain, docs_per_row in rows.items():
        w = ShardWriter(cache_dir, f"{split}/{domain}/shard-00000.parquet", codec, row_group_rows=2, packing=packing)
        for i, docs in enumerate(docs_per_row):
            fill = T - sum(len(ids) for ids, _ in docs)
            docs = [*docs, doc(([eos] * fill, False))] if fill else docs
            input_ids = np.array([t for ids, _ in docs for t in ids], np.int32)                  # (T,)
            sup = np.concatenate([np.append(np.array(tr[1:], bool), False) for _, tr in docs])   # (T,)
            logits = rng.normal(size=(T, K + 1))
            lp = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), -1)[:, ::-1][:, :K]
            topk_logprobs = np.where(sup[:, None], lp, -np.inf).astype(np.float32)              # (T, K)
            topk_ids = rng.integers(0, V, size=(T, K)).astype(np.int32)                          # (T, K)
            target = np.where(sup, lp[:, 0], np.nan).astype(np.float32)                          # (T,)
            row = {"row_index": i, "domain": domain, "input_ids": input_ids, "topk_ids": topk_ids,
                   "topk_logprobs": topk_logprobs, "target_logprobs": target}
            if packing == "isolated":
                row["doc_lengths"] = [len(ids) for ids, _ in docs]
            w.write(row)
        shard = w.close()
        domains[domain] = DomainInfo(rows=shard.rows, tokens=shard.tokens, shards=[shard])
    manifest = Manifest(
        teacher=TeacherInfo(path="synthetic", name="synthetic", fingerprint="0" * 64, engine="synthetic",
                            engine_version="0", logprobs_mode="raw_logprobs", dtype="float32"),
        tokenizer=tokenizer_info, top_k=K, seq_len=T, codec=codec.params(),
        split=SplitRule(rule="synthetic", seed=seed, val_fraction=1.0), splits={split: domains}, packing=packing)
    write_manifest(cache_dir, manifest)
    return cache_dir


def test_last_replies_extracts_the_planted_spans(tmp_path):
    P1, R1 = [5, 6, 7], [8, 9, 1]             # 1: the end-of-turn token
    P2, R2 = [10, 11], [12, 1]
    H, A, U, B = [20, 21], [22, 1], [23, 24], [25, 26, 1]
    rows = {"chat": [[doc((P1, False), (R1, True)), doc((P2, False), (R2, True), ([2], False))],
                     [doc((H, False), (A, True), (U, False), (B, True))],      # two replies: the last counts
                     [doc(([3, 4], False))]]}                                # no reply: skipped
    info = TokenizerInfo(vocab_size=32, fingerprint="0" * 64, eos_id=0)
    cache = open_cache(write_chat_cache(tmp_path / "c", rows, T=16, tokenizer_info=info))
    assert last_replies(cache, "val", "chat", 10) == [(P1, R1), (P2, R2), (H + A + U, B)]
    assert last_replies(cache, "val", "chat", 2) == [(P1, R1), (P2, R2)]
    assert last_replies(cache, "val", "chat", 0) == []


def test_text_documents_have_no_reply_to_answer(tmp_path):
    info = TokenizerInfo(vocab_size=32, fingerprint="0" * 64, eos_id=0)
    rows = {"web": [[doc(([5], False), (list(range(6, 21)), True))]]}       # every next token trained
    cache = open_cache(write_chat_cache(tmp_path / "c", rows, T=16, tokenizer_info=info, packing="concat"))
    assert last_replies(cache, "val", "web", 2) == []
    with pytest.raises(KdcacheError, match=r"--generate needs conversations .* split 'val' has none \(domains: web\)"):
        generation_report(cache, None, None, "val", 2, 4)


def test_rouge_l():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["def return if"], ["the a of"]) == 0.0
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on the rug"]) == pytest.approx(4 / 6)  # LCS 4 of 6
    assert rouge_l(["the cats are running", "x y"], ["the cat is running", "z"]) == pytest.approx((3 / 4 + 0) / 2)
    assert 0.0 <= rouge_l(["", "a"], ["b", ""]) <= 1.0


def test_greedy_replies_deterministic_with_length_and_stop_ids(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"][:n] for t, n in zip(domain_texts("code", 3, seed=5), (9, 2, 5))]
    eos = {tok.eos_token_id}
    first = generate_replies(model, prompts, 10, eos, batch_size=3)
    assert first == generate_replies(model, prompts, 10, eos, batch_size=3)
    assert first == [generate_replies(model, [p], 10, eos, batch_size=1)[0] for p in prompts]   # padding-free
    x = torch.tensor([prompts[0]])                                                 # (1, 9): HF's own greedy agrees
    hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
    assert first[0] == [t for t in hf if t != tok.eos_token_id][:len(first[0])] and len(first[0]) <= len(hf)
    assert all(len(r) <= 10 for r in first)
    assert all(len(r) <= 3 for r in generate_replies(model, prompts, 3, eos))
    assert all(t < 50 for r in generate_replies(model, prompts, 10, eos, vocab_size=50) for t in r)
    reply = first[0]
    assert len(reply) >= 4 and tok.eos_token_id not in reply
    cut = reply.index(reply[3])                             # the first time that token comes
    assert generate_replies(model, prompts[:1], 10, eos | {reply[3]})[0] == reply[:cut]


def test_sample_next_keeps_transformers_nucleus():
    """The nucleus against a reference written from its definition: the smallest set of most likely ids whose
    probability reaches top_p (transformers keeps an id unless the ids less likely than it, with it, sum to
    <= 1 - top_p); ids outside it are never drawn, and top_p 1 keeps every id."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0, 1.0]])      # (2, 5)
    for top_p in (0.3, 0.6, 0.8, 0.95, 1.0):
        probs = (logits / 0.7).softmax(-1)
        for b in range(2):
            order = probs[b].argsort(descending=True).tolist()
            keep, mass = set(), 0.0
            for i in order:                                    # most likely first, until the mass reaches top_p
                keep.add(i)
                mass += float(probs[b, i])
                if mass >= top_p - 1e-7:
                    break
            g = torch.Generator().manual_seed(top_p.__hash__() % 1000)
            drawn = {int(sample_next(logits[b:b + 1].expand(400, -1), 0.7, top_p, g)[j, 0]) for j in range(400)}
            assert drawn <= keep and len(drawn) == len(keep), (top_p, b, drawn, keep)
    # temperature: the frequencies follow softmax(logits / T)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits[:1].expand(20000, -1), 2.0, 1.0, g)[:, 0]
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert torch.allclose(freq, (logits[0].double() / 2).softmax(-1), atol=0.015), freq


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_sampled_replies_match_transformers_generate(tiny_models, temperature, top_p):
    """Same seed, same draws (up to 40 tokens each): kdcache's sampler against transformers' generate(do_sample=True) on equal-length
    prompts (no padding, where the two loops agree), one prompt and a batch of eight; reproducible; another seed
    gives other replies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"][:7] for t in domain_texts("prose", 8, seed=11)]
    stop = {tok.eos_token_id}
    for batch in (prompts[:1], prompts):
        ours = generate_replies(model, batch, 40, stop, batch_size=len(batch), temperature=temperature,
                                top_p=top_p, seed=3)
        assert sum(map(len, ours)) >= 10 * len(batch)
        assert ours == generate_replies(model, batch, 40, stop, batch_size=len(batch), temperature=temperature,
                                        top_p=top_p, seed=3)
        torch.manual_seed(3)
        x = torch.tensor(batch)
        hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                            top_p=top_p, top_k=0, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id)[:, x.shape[1]:].tolist()
        for mine, theirs in zip(ours, hf):
            cut = next((i for i, t in enumerate(theirs) if t in stop), len(theirs))
            assert mine == theirs[:cut], (mine, theirs)
    draws = [generate_replies(model, prompts, 12, stop, temperature=temperature, top_p=top_p, seed=s)
             for s in range(4)]
    assert len({str(d) for d in draws}) > 1


@pytest.fixture(scope="module")
def chat_caches(tiny_models, tmp_path_factory):
    """A chat cache (isolated, two domains, real token ids of the tiny tokenizer) and a text (concat) cache."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    info = TokenizerInfo(vocab_size=len(tok), fingerprint=tokenizer_fingerprint(tok), eos_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("chat_caches")
    rows = {}
    for domain in ("code", "prose"):
        texts = [tok(t)["input_ids"] for t in domain_texts(domain, 6, seed=7)]
        convs = [doc((texts[2 * i][:10], False), (texts[2 * i + 1][:6] + [tok.eos_token_id], True)) for i in range(3)]
        rows[domain] = [[convs[0], convs[1]], [convs[2]]]
    text = tok(" ".join(domain_texts("prose", 20)))["input_ids"][:48]
    return {"chat": write_chat_cache(root / "chat", rows, T=48, tokenizer_info=info),
            "text": write_chat_cache(root / "text", {"prose": [[doc((text[:1], False), (text[1:], True))]]},
                                     T=48, tokenizer_info=info, packing="concat")}


def eval_cli(*args: str):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_eval_generate_end_to_end(chat_caches, tiny_models, tmp_path):
    out = tmp_path / "eval.json"
    r = eval_cli("--cache", chat_caches["chat"], "--student", tiny_models["student"], "--generate", 2,
                 "--max-new-tokens", 6, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert {k: v for k, v in saved.items() if k != "config"} == json.loads(r.stdout)
    assert saved["config"]["generate"] == 2 and saved["config"]["max_new_tokens"] == 6
    student = saved["generate"]["student"]
    assert set(saved["generate"]) == {"student"} and sorted(student["domains"]) == ["code", "prose"]
    for name, d in student["domains"].items():
        assert d["n"] == 2 and 0.0 <= d["rouge_l"] <= 1.0 and len(d["examples"]) == 2
        assert set(d["examples"][0]) == {"prompt", "reference", "reply"} and d["examples"][0]["reference"]
        assert saved["domains"][name]["rouge_l"] == d["rouge_l"]
    assert student["mean"]["n"] == 4 and 0.0 <= student["mean"]["rouge_l"] <= 1.0

    r = eval_cli("--cache", chat_caches["chat"], "--student", tiny_models["student"], "--generate", 5,
                 "--max-new-tokens", 4, "--teacher", tiny_models["teacher"], "--out", out)
    assert r.exit_code == 0, r.output
    assert "rouge_l student" in r.stdout and "rouge_l teacher" in r.stdout
    gen = json.loads(out.read_text())["generate"]
    assert set(gen) == {"student", "teacher"}
    assert all(d["n"] == 3 and 0.0 <= d["rouge_l"] <= 1.0 for d in gen["teacher"]["domains"].values())
    assert gen["student"]["decoding"] == {"temperature": None, "top_p": 1.0, "samples": 1, "seed": 0}


def test_eval_generate_sampled(chat_caches, tiny_models, tmp_path):
    """--temperature/--top-p/--samples: the mean and the spread over seeded draws in the JSON; the same command
    gives the same report; the mean is the mean of the draws, each draw the mean over domains."""
    def run(*extra):
        r = eval_cli("--cache", chat_caches["chat"], "--student", tiny_models["student"], "--generate", 3,
                     "--max-new-tokens", 6, "--temperature", 1, "--samples", 4, "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["generate"]["student"]

    gen = run()
    assert gen == run()
    assert gen["decoding"] == {"temperature": 1.0, "top_p": 1.0, "samples": 4, "seed": 0}
    for d in [*gen["domains"].values(), gen["mean"]]:
        draws = d["rouge_l_samples"]
        assert len(draws) == 4 and d["rouge_l"] == pytest.approx(np.mean(draws))
        assert d["rouge_l_std"] == pytest.approx(np.std(draws, ddof=1))
    assert gen["mean"]["rouge_l_samples"] == pytest.approx(
        np.mean([d["rouge_l_samples"] for d in gen["domains"].values()], axis=0))
    assert run("--seed", 1)["mean"]["rouge_l_samples"][:3] == gen["mean"]["rouge_l_samples"][1:]
    r = eval_cli("--cache", chat_caches["chat"], "--student", tiny_models["student"], "--generate", 3,
                 "--max-new-tokens", 6, "--temperature", 0.8, "--top-p", 0.9, "--samples", 2)
    assert r.exit_code == 0 and " ± " in r.stdout, r.output


@pytest.mark.parametrize("args, message", [
    (["--teacher", "T"], "add --generate N"),
    (["--generate", "-1"], "--generate -1: must be >= 0"),
    (["--generate", "1", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--generate", "1", "--text"], "--generate needs conversations"),
    (["--generate", "1", "--temperature", "0"], "--temperature 0.0: must be a finite number > 0"),
    (["--generate", "1", "--temperature", "-1"], "--temperature -1.0: must be a finite number > 0"),
    (["--generate", "1", "--temperature", "nan"], "--temperature nan: must be a finite number > 0"),
    (["--generate", "1", "--temperature", "1", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--generate", "1", "--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--generate", "1", "--temperature", "1", "--samples", "0"], "--samples 0: must be >= 1"),
    (["--generate", "1", "--samples", "3"], "--samples 3: applies to sampled replies"),
    (["--generate", "1", "--top-p", "0.9"], "--top-p 0.9: applies to sampled replies"),
    (["--temperature", "1"], "--temperature 1.0: only applies to generated replies; add --generate N"),
])
def test_eval_generate_bad_inputs(chat_caches, tiny_models, args, message):
    cache = chat_caches["text" if "--text" in args else "chat"]
    args = [tiny_models["teacher"] if a == "T" else a for a in args if a != "--text"]
    r = eval_cli("--cache", cache, "--student", tiny_models["student"], *args)
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]    # (and load progress bars)
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0] and message in errors[0], r.stderr


def test_last_replies_of_a_captured_chat_cache(tiny_models, tmp_path):
    """The layout `kdcache capture --format chat --packing isolated` writes is the one last_replies reads."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{{ m.role + ':\\n' }}{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content + '<|eos|>' }}{% endgeneration %}{% else %}{{ m.content + '<|eos|>' }}{% endif %}"
                "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    (tmp_path / "chat.jinja").write_text(template)
    chats = [[{"role": "user", "content": f"def f {i} x"}, {"role": "assistant", "content": f"return x {i}"},
              {"role": "user", "content": f"sum of {i} + 2"}, {"role": "assistant", "content": f"the sum is {i + 2}"}]
             for i in range(8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    r = CliRunner().invoke(cli, ["capture", "--teacher", str(tiny_models["teacher"]), "--backend", "hf",
                                 "--data", f"chat={tmp_path / 'chat.jsonl'}", "--out", str(tmp_path / "cache"),
                                 "--format", "chat", "--packing", "isolated", "--chat-template",
                                 str(tmp_path / "chat.jinja"), "--top-k", "4", "--seq-len", "64",
                                 "--val-fraction", "0"])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    pairs = last_replies(open_cache(tmp_path / "cache"), "train", "chat", 100)
    assert len(pairs) == len(chats)
    for prompt, reply in pairs:
        i = int(tok.decode(prompt).split("def f ")[1].split()[0])
        assert tok.decode(prompt) == (f"user:\ndef f {i} x<|eos|>\nassistant:\nreturn x {i}<|eos|>\n"
                                      f"user:\nsum of {i} + 2<|eos|>\nassistant:\n")
        assert tok.decode(reply) == f"the sum is {i + 2}<|eos|>"
