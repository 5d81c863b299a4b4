"""Load test of `llmkit serve`: 1, 8 and 32 concurrent streaming chat clients on loopback, the official `openai`
client in threads. Continuous batching is what makes 8 clients' aggregate tokens/s several times one client's.

Starts its own server (smollm2-135m-instruct by default), runs each concurrency level with every client sending
`--requests` streamed requests one after another (bounded by `--level-seconds` too), and prints ONE JSON object:
errors, aggregate tokens/s per level and the 8/1 ratio, time to first token p50/p99 per level, the server's peak
RSS (VmHWM from /proc) and the CPU model.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--clients 1,8,32] [--requests 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
             "Write a haiku about the sea.", "What is 12 times 12?", "Give me a tip for sleeping well.",
             "What does a compiler do?", "Describe a cat in one sentence."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmkit.cli.main", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "256", "--served-model-name", "bench"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server not healthy after 300 s")


def one_client(client: openai.OpenAI, k: int, args: argparse.Namespace, stop_at: float, out: dict) -> None:
    """Send streamed requests one after another; record tokens, time to first token and errors."""
    for r in range(args.requests):
        if time.monotonic() > stop_at:
            return
        t0 = time.perf_counter()
        first = None
        try:
            stream = client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": QUESTIONS[(k + r) % len(QUESTIONS)]}],
                max_tokens=args.max_tokens, temperature=0.7, seed=k * 1000 + r, stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    out["tokens"] += chunk.usage.completion_tokens
            out["ttft"].append(first if first is not None else time.perf_counter() - t0)
        except Exception as e:  # every failure is counted and named: the bench reports, it does not stop
            out["errors"].append(f"{type(e).__name__}: {e}"[:200])


def run_level(url: str, n: int, args: argparse.Namespace) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.level_seconds + 60)
    results = [{"tokens": 0, "ttft": [], "errors": []} for _ in range(n)]
    stop_at = time.monotonic() + args.level_seconds
    threads = [threading.Thread(target=one_client, args=(client, k, args, stop_at, results[k])) for k in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = np.array([x for r in results for x in r["ttft"]])
    errors = [e for r in results for e in r["errors"]]
    return {"clients": n, "requests": len(ttft) + len(errors), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "errors": len(errors), "error_samples": errors[:3],
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3) if len(ttft) else None,
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3) if len(ttft) else None}


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="what `llmkit serve --model` takes")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="streamed requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: PyTorch's)")
    p.add_argument("--level-seconds", type=float, default=180, help="no new request starts after this, per level")
    p.add_argument("--log", default="/tmp/llmkit-serve-load.log", help="the server's output")
    args = p.parse_args()

    proc, url = start_server(args, Path(args.log))
    try:
        run_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up, not reported
        levels = {n: run_level(url, n, args) for n in (int(c) for c in args.clients.split(","))}
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tps = {n: lv["tokens_per_s"] for n, lv in levels.items()}
    print(json.dumps({
        "bench": "serve_load", "model": args.model, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "requests_per_client": args.requests, "errors": sum(lv["errors"] for lv in levels.values()),
        "tokens_per_s": {str(n): v for n, v in tps.items()},
        "ratio_8_over_1": round(tps[8] / tps[1], 2) if 8 in tps and 1 in tps and tps[1] else None,
        "ttft_p50_s": {str(n): lv["ttft_p50_s"] for n, lv in levels.items()},
        "ttft_p99_s": {str(n): lv["ttft_p99_s"] for n, lv in levels.items()},
        "levels": list(levels.values()), "server_peak_rss_mib": rss, "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "server_threads": args.threads,
    }))


if __name__ == "__main__":
    main()
