"""`GET /metrics`: Prometheus text exposition, written by hand (a few counters do not need a client library).

HTTP requests are counted by path and status in an ASGI wrapper, so refusals (401, 413, 429) are counted as well as
answers. Time to first token is measured where the client feels it: from the moment the body was read to the first
token the engine hands back, in a cumulative histogram. Token counts, queue depth and running rows come from the
engine's own `stats`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KNOWN_PATHS = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                         "/v1/embeddings"})


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http: Counter[tuple[str, int]] = Counter()
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_n = 0.0, 0

    def count(self, path: str, status: int) -> None:
        # Unknown paths share one label: a scanner probing random URLs must not grow the label set without bound.
        with self._lock:
            self.http[(path if path in KNOWN_PATHS else "other", status)] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            for i, edge in enumerate(TTFT_BUCKETS):
                if seconds <= edge:
                    self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_n += 1

    def render(self, engine_stats: dict[str, Any] | None) -> str:
        lines = ["# HELP llmkit_http_requests_total HTTP requests answered, by path and status.",
                 "# TYPE llmkit_http_requests_total counter"]
        with self._lock:
            for (path, status), n in sorted(self.http.items()):
                lines.append(f'llmkit_http_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += ["# HELP llmkit_time_to_first_token_seconds From request to the first generated token.",
                      "# TYPE llmkit_time_to_first_token_seconds histogram"]
            for edge, n in zip(TTFT_BUCKETS, self.ttft_counts):
                lines.append(f'llmkit_time_to_first_token_seconds_bucket{{le="{edge}"}} {n}')
            lines += [f'llmkit_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_n}',
                      f"llmkit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"llmkit_time_to_first_token_seconds_count {self.ttft_n}"]
        s = engine_stats or {}
        for name, kind, key, help_text in (
            ("llmkit_requests_total", "counter", "requests_total", "Generation requests submitted to the engine."),
            ("llmkit_requests_running", "gauge", "requests_running", "Requests in the running batch."),
            ("llmkit_queue_depth", "gauge", "queue_depth", "Requests waiting for a batch slot."),
            ("llmkit_prompt_tokens_total", "counter", "prompt_tokens_total", "Prompt tokens read."),
            ("llmkit_completion_tokens_total", "counter", "completion_tokens_total", "Tokens generated."),
            ("llmkit_decode_steps_total", "counter", "steps_total", "Batched decode steps run."),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {int(s.get(key, 0))}"]
        return "\n".join(lines) + "\n"


class CountRequests:
    """ASGI wrapper: counts every HTTP answer by path and status, whichever layer produced it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count(scope.get("path", ""), status[0])
