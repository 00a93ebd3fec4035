"""Capture from a served teacher: `kdcache capture --teacher-url` through one and two local vLLM servers against the
in-process vLLM engine, same teacher, corpus and options, side by side in one run; and tokens/s against
--max-concurrency on one server (table + plot).

    python scripts/bench_served.py [--teacher DIR] [--tokens-per-domain 20000] [--seq-len 256] [--k 64]
                                   [--concurrency 1,2,4,8,16,32] [--compile] [--out FILE.json] [--plot FILE.png]

The teacher defaults to the demo's reference teacher (Llama, 4 layers, d=128, V=4096) and the corpus to its five
domains. Tokens/s is each capture's own figure (`captured N tokens in S s`: tokenisation, requests or engine,
writing; the engine start and the servers' checks excluded). Servers run as users run them (engine core in its own
process), eager unless --compile, like the in-process engine. On a machine with few cores the servers and the
client share them: the figures say what the client costs, not what a fleet of GPUs gives. The last line printed
is a JSON object with every number.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import VLLMServer  # noqa: E402  (the tests' local server)

REFERENCE = ROOT / "pipeline" / "assets" / "reference"


def capture(out: Path, teacher: list[str], args, *extra) -> float:
    """`kdcache capture` as a user runs it; its tokens/s."""
    data = [a for f in sorted((REFERENCE / "corpus").glob("*.jsonl")) for a in ("--data", f"{f.stem}={f}")]
    cmd = [sys.executable, "-m", "pipeline", "capture", *teacher, *data, "--out", str(out), "--top-k", str(args.k),
           "--seq-len", str(args.seq_len), "--val-fraction", "0", "--max-tokens-per-domain",
           str(args.tokens_per_domain), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return float(re.search(r"captured \d+ tokens in [\d.]+s \((\d+) tokens/s", r.stderr).group(1))


def plot(sweep: dict[int, float], reference: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(list(sweep), list(sweep.values()), "o-", label="one server (token endpoint)")
    ax.axhline(reference, color="gray", ls="--", label="in-process vLLM (logprobs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("--max-concurrency (requests in flight per server)")
    ax.set_ylabel("capture tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(REFERENCE / "teacher"))
    ap.add_argument("--tokens-per-domain", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--compile", action="store_true", help="vLLM's default torch.compile / CUDA graphs (GPU runs)")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--plot", type=Path, help="tokens/s against --max-concurrency (PNG)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_served_"))
    eager = () if args.compile else ("--enforce-eager",)
    local = ["--teacher", args.teacher, "--backend", "vllm", "--gpu-memory-utilization", "0.2", *eager]
    result = {"teacher": args.teacher, "seq_len": args.seq_len, "k": args.k,
              "tokens_per_domain": args.tokens_per_domain, "eager": not args.compile}
    tok_s = {}
    for output in ("logprobs", "hidden"):
        tok_s[f"in-process vLLM, --vllm-output {output}"] = capture(tmp / f"local_{output}", local, args,
                                                                    "--vllm-output", output)
    started = time.perf_counter()
    servers = [VLLMServer(Path(args.teacher), tmp / f"server{i}.log", *(["--enable-scale-out"] if i < 2 else []),
                          in_process=False, max_model_len=args.seq_len + 1, eager=not args.compile)
               for i in range(3)]
    try:
        a, b, plain = [s.wait() for s in servers]
        result["server_start_s"] = round(time.perf_counter() - started, 1)
        served = ["--tokenizer", args.teacher]
        sweep = {}
        for c in map(int, args.concurrency.split(",")):
            sweep[c] = capture(tmp / f"one_{c}", ["--teacher-url", a.url, *served], args, "--max-concurrency", str(c))
            print(f"one server, --max-concurrency {c}: {sweep[c]:.0f} tok/s", file=sys.stderr)
        best = max(sweep, key=sweep.get)
        tok_s[f"1 server, token endpoint (--max-concurrency {best})"] = sweep[best]
        tok_s[f"1 server, /v1/completions (--max-concurrency {best})"] = capture(
            tmp / "plain", ["--teacher-url", plain.url, *served], args, "--max-concurrency", str(best))
        tok_s[f"2 servers, token endpoint (--max-concurrency {best} each)"] = capture(
            tmp / "two", ["--teacher-url", a.url, "--teacher-url", b.url, *served], args, "--max-concurrency",
            str(best))
    finally:
        for s in servers:
            s.kill()
    reference = tok_s["in-process vLLM, --vllm-output logprobs"]
    result["tokens_per_s"] = tok_s
    result["ratio_to_in_process_logprobs"] = {k: round(v / reference, 3) for k, v in tok_s.items()}
    result["concurrency_sweep_tokens_per_s"] = sweep
    for name, v in tok_s.items():
        print(f"{name:55s} {v:>9.0f} tok/s   {v / reference:5.2f}x in-process logprobs", file=sys.stderr)
    if args.plot:
        plot(sweep, reference, args.plot)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
