"""Server metrics in the Prometheus text format (version 0.0.4).

Written by hand rather than with prometheus_client: the server needs a handful
of counters and histograms, and one dependency fewer on the GPU image.

Speculative counters follow vLLM's definitions (see easyspec.runtime.stats):
a draft is one verification round, mean acceptance length is
1 + accepted tokens / drafts (the bonus or recovered token counted), so plain
decoding reads 1.0; the server-wide gauge divides the totals, the per-request
histogram observes each request's own. The batch-size histogram observes, at
every engine step, how many sequences committed tokens in it. Updates come
from the engine thread and the event loop, reads from the event loop, hence
one lock around everything.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

PREFIX = "easyspec_"
# Each metric family (its name after PREFIX) and vLLM's metric for the same quantity, None where vLLM
# has none; the HELP lines and the README's table name them, so dashboards can be ported.
VLLM_NAMES: dict[str, str | None] = {
    "requests_total": "http_requests_total",
    "request_finished_total": "vllm:request_success_total",
    "prompt_tokens_total": "vllm:prompt_tokens_total",
    "generation_tokens_total": "vllm:generation_tokens_total",
    "time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "time_per_output_token_seconds": "vllm:time_per_output_token_seconds",
    "e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "queue_wait_seconds": "vllm:request_queue_time_seconds",
    "spec_decode_num_drafts_total": "vllm:spec_decode_num_drafts_total",
    "spec_decode_num_draft_tokens_total": "vllm:spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total": "vllm:spec_decode_num_accepted_tokens_total",
    "spec_decode_num_accepted_tokens_per_pos_total": "vllm:spec_decode_num_accepted_tokens_per_pos_total",
    "spec_decode_mean_acceptance_length": None,
    "request_mean_acceptance_length": None,
    "num_requests_waiting": "vllm:num_requests_waiting",
    "num_requests_running": "vllm:num_requests_running",
    "batch_size": None,
    "engine_healthy": None,
    "model_info": None,
}

# Seconds; spans a tiny CPU model's milliseconds to a large model's queue waits.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Mean acceptance length of one request: 1.0 (plain decoding, or nothing accepted) up to a deep tree's.
ACCEPTANCE_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 16.0)
# Sequences in one engine step: powers of two, as batch sizes are usually set.
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)
    return "{" + inner + "}"


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.drafts = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_position: list[int] = []
        self.ttft = Histogram()
        self.tpot = Histogram()
        self.e2e = Histogram()
        self.queue_wait = Histogram()
        self.request_acceptance = Histogram(ACCEPTANCE_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def record_start(self, queue_wait_s: float) -> None:
        with self._lock:
            self.queue_wait.observe(queue_wait_s)

    def record_step(self, sequences: int) -> None:
        """One engine step, in which `sequences` requests committed tokens (0: only prefill chunks or
        cancellations, not observed)."""
        if sequences:
            with self._lock:
                self.batch_size.observe(sequences)

    def record_withdrawn(self) -> None:
        """A request whose client went away while it waited: it ends cancelled without running."""
        with self._lock:
            self.finished["cancelled"] += 1

    def record_finish(self, finish_reason: str, prompt_tokens: int, stats: dict | None,
                      ttft_s: float | None, e2e_s: float, decode_s: float) -> None:
        """One request that ran, to its end, to cancellation or to an engine error; `stats` is
        SpecStats.to_dict(), None when the engine raised before its first token."""
        stats = stats or {}
        with self._lock:
            self.finished[finish_reason] += 1
            self.prompt_tokens += prompt_tokens
            generated = stats.get("generated", 0)
            self.generation_tokens += generated
            self.drafts += stats.get("rounds", 0)
            self.draft_tokens += stats.get("drafted", 0)
            self.accepted_tokens += stats.get("accepted", 0)
            if stats.get("rounds"):
                self.request_acceptance.observe(1.0 + stats["accepted"] / stats["rounds"])
            per_position = stats.get("accepted_per_position", [])
            missing = len(per_position) - len(self.accepted_per_position)
            self.accepted_per_position.extend([0] * max(0, missing))
            for i, count in enumerate(per_position):
                self.accepted_per_position[i] += count
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.e2e.observe(e2e_s)
            if generated > 1:  # the first token's latency is TTFT, not a per-token step
                self.tpot.observe(decode_s / (generated - 1))

    def render(self, queue_length: int, running: int, healthy: bool) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            vllm = f" vLLM: {VLLM_NAMES[name]}." if VLLM_NAMES[name] else ""
            out.append(f"# HELP {PREFIX}{name} {help_text}{vllm}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(lines)

        def sample(name: str, value: float, labels: tuple[tuple[str, str], ...] = ()) -> str:
            text = "NaN" if math.isnan(value) else str(value)  # the exposition format spells it NaN
            return f"{PREFIX}{name}{_labels(labels)} {text}"

        with self._lock:
            mean_len = 1.0 + self.accepted_tokens / self.drafts if self.drafts else math.nan
            family("requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [sample("requests_total", n, key) for key, n in sorted(self.requests.items())])
            family("request_finished_total", "counter",
                   "Requests ended, by finish reason (cancelled: the client went away, waiting or running; "
                   "error: the request failed in the engine).",
                   [sample("request_finished_total", n, (("finish_reason", reason),))
                    for reason, n in sorted(self.finished.items())])
            family("prompt_tokens_total", "counter", "Prompt tokens processed.",
                   [sample("prompt_tokens_total", self.prompt_tokens)])
            family("generation_tokens_total", "counter", "Tokens generated.",
                   [sample("generation_tokens_total", self.generation_tokens)])
            family("time_to_first_token_seconds", "histogram", "From arrival in the queue to the first token.",
                   self.ttft.render(PREFIX + "time_to_first_token_seconds"))
            family("time_per_output_token_seconds", "histogram",
                   "Per request: time after the first token divided by the tokens after it.",
                   self.tpot.render(PREFIX + "time_per_output_token_seconds"))
            family("e2e_request_latency_seconds", "histogram", "From arrival in the queue to the last token.",
                   self.e2e.render(PREFIX + "e2e_request_latency_seconds"))
            family("queue_wait_seconds", "histogram", "From arrival to a free sequence slot in the engine.",
                   self.queue_wait.render(PREFIX + "queue_wait_seconds"))
            family("spec_decode_num_drafts_total", "counter",
                   "Verification rounds (vLLM: drafts); plain decoding counts one per token.",
                   [sample("spec_decode_num_drafts_total", self.drafts)])
            family("spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed.",
                   [sample("spec_decode_num_draft_tokens_total", self.draft_tokens)])
            family("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted and emitted.",
                   [sample("spec_decode_num_accepted_tokens_total", self.accepted_tokens)])
            family("spec_decode_num_accepted_tokens_per_pos_total", "counter",
                   "Rounds whose draft token at this position (0-based) was accepted.",
                   [sample("spec_decode_num_accepted_tokens_per_pos_total", n, (("position", str(i)),))
                    for i, n in enumerate(self.accepted_per_position)])
            family("spec_decode_mean_acceptance_length", "gauge",
                   "1 + accepted tokens / drafts since start (NaN before the first round).",
                   [sample("spec_decode_mean_acceptance_length", mean_len)])
            family("request_mean_acceptance_length", "histogram",
                   "Per request: 1 + its accepted tokens / its drafts (requests with at least one round).",
                   self.request_acceptance.render(PREFIX + "request_mean_acceptance_length"))
            family("num_requests_waiting", "gauge", "Requests in the queue, not yet decoding.",
                   [sample("num_requests_waiting", queue_length)])
            family("num_requests_running", "gauge",
                   "Requests being decoded together (at most --max-num-seqs), prefill included.",
                   [sample("num_requests_running", running)])
            family("batch_size", "histogram", "Per engine step: the requests that committed tokens in it.",
                   self.batch_size.render(PREFIX + "batch_size"))
        family("engine_healthy", "gauge", "1 while the engine works, 0 after a worker failure.",
               [sample("engine_healthy", int(healthy))])
        family("model_info", "gauge", "The served model name.",
               [sample("model_info", 1, (("model_name", self.model_name),))])
        return "\n".join(out) + "\n"
