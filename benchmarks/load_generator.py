"""Closed-loop streaming load generator for benchmarks/serving.py (asyncio + aiohttp).

`concurrency` clients each send one request, read its stream to the end, and send the next, until
the workload or the time limit runs out. Two protocols: TGI's POST /generate_stream (one SSE event
per token) and OpenAI's POST /v1/completions with stream=true (one chunk per token as vLLM and
llama.cpp's servers send them; a closing chunk with no text is not a token). Per request it
records the time to the first token and every inter-token gap; at the time limit the requests
still running are cancelled and what they produced counts.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    prompt_tokens: int
    max_new_tokens: int


@dataclass(slots=True)
class RequestResult:
    sent: float
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # perf_counter of each streamed token event
    done: bool = False
    error: str | None = None


def synthesize_workload(tokenizer: Any, n: int, seed: int, input_median: int, output_median: int,
                        max_input: int = 1024, max_output: int = 256) -> list[RequestSpec]:
    """Chat-like lengths: log-normal input and output lengths (sigma 0.6 and 0.5, clipped to
    [16, max_input] and [8, max_output]); prompts are slices of real text (the stdlib's sources)
    so every server's tokenizer sees ordinary text. Seeded: the same list for every server."""
    rng = np.random.default_rng(seed)
    corpus = _corpus_ids(tokenizer)
    specs = []
    for _ in range(n):
        n_in = int(np.clip(rng.lognormal(np.log(input_median), 0.6), 16, max_input))
        n_out = int(np.clip(rng.lognormal(np.log(output_median), 0.5), 8, max_output))
        start = int(rng.integers(0, len(corpus) - n_in))
        text = tokenizer.decode(corpus[start: start + n_in])
        specs.append(RequestSpec(text, len(tokenizer(text)["input_ids"]), n_out))
    return specs


def _corpus_ids(tokenizer: Any, limit: int = 200_000) -> list[int]:
    import glob
    import os
    import sysconfig

    ids: list[int] = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            break
    return ids


def _payload(protocol: str, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
    if protocol == "tgi":
        return "/generate_stream", {"inputs": spec.prompt, "parameters": {
            "max_new_tokens": spec.max_new_tokens, "do_sample": False}}
    return "/v1/completions", {"prompt": spec.prompt, "max_tokens": spec.max_new_tokens, "temperature": 0.0,
                               "stream": True}


def _tokens_in(protocol: str, data: bytes) -> int:
    """Generated tokens carried by one SSE data payload."""
    if data == b"[DONE]":
        return 0
    event = json.loads(data)
    if "error" in event and event["error"]:
        raise RuntimeError(str(event["error"]))
    if protocol == "tgi":
        return 1 if event.get("token") is not None else 0
    choices = event.get("choices") or []
    # llama-server (and llama-cpp-python) close a stream with an empty-text chunk that only carries
    # the finish reason; vLLM sends its finish reason with the last token's text
    return 1 if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None) else 0


async def _post(session: Any, url: str, body: dict[str, Any]) -> Any:
    """POST; once more on a fresh connection when a pooled keep-alive connection turns out closed
    by the server before the request got through (llama-server closes idle ones after 5 s). The
    time of the failed attempt stays in the request's TTFT."""
    import aiohttp

    try:
        return await session.post(url, json=body)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        return await session.post(url, json=body)


async def _one(session: Any, base_url: str, protocol: str, spec: RequestSpec, result: RequestResult) -> None:
    path, body = _payload(protocol, spec)
    last = result.sent
    async with await _post(session, base_url + path, body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            n = _tokens_in(protocol, line[5:].strip())
            if not n:
                continue
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - result.sent
            else:
                result.itls.append(now - last)
            last = now
            result.output_tokens += n
            result.token_times += [now] * n
    result.done = True


async def run_level(base_url: str, protocol: str, workload: list[RequestSpec], concurrency: int,
                    time_limit: float) -> dict[str, Any]:
    """Run `workload` with `concurrency` closed-loop clients; returns the level's metrics."""
    import aiohttp

    queue = list(reversed(workload))
    results: list[RequestResult] = []
    idle_since: list[float] = []  # when each client found the queue empty
    start = time.perf_counter()
    deadline = start + time_limit

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            if not queue:
                idle_since.append(time.perf_counter())
                return
            if time.perf_counter() >= deadline:
                return
            spec = queue.pop()
            result = RequestResult(time.perf_counter())
            results.append(result)
            try:
                await _one(session, base_url, protocol, spec, result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded per request, the level goes on
                result.error = f"{type(exc).__name__}: {exc}"

    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    end = time.perf_counter()
    full_until = min(idle_since, default=end)  # every client had a request in flight until then
    level = summarize_level(results, concurrency, end - start, cut=bool(pending))
    level.update(steady_level(results, start, full_until))
    return level


def steady_level(results: list[RequestResult], start: float, full_until: float) -> dict[str, Any]:
    """Output tokens/s while all clients were busy: from the start until the first client found
    the workload used up (or the time limit). A finite workload ends with a drain, fewer and
    fewer requests in flight, which a batching server spends at low occupancy and a one-at-a-time
    server not at all; this window is the sustained rate under the level's concurrency."""
    window = full_until - start
    tokens = sum(start <= t <= full_until for r in results for t in r.token_times)
    return {"steady_window_s": window, "steady_output_tokens_per_s": tokens / window if window > 0 else None}


def summarize_level(results: list[RequestResult], concurrency: int, elapsed: float, cut: bool) -> dict[str, Any]:
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [x for r in results for x in r.itls]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else None  # noqa: E731
    errors = [r.error for r in results if r.error]
    return {
        "concurrency": concurrency, "elapsed_s": elapsed, "time_limit_hit": cut,
        "requests_sent": len(results), "requests_completed": sum(r.done for r in results),
        "requests_without_first_token": sum(r.ttft is None for r in results), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tokens": sum(r.output_tokens for r in results),
        "requests_per_s": sum(r.done for r in results) / elapsed,
        "output_tokens_per_s": sum(r.output_tokens for r in results) / elapsed,
        "ttft_ms": {"p50": pct(ttfts, 50), "p99": pct(ttfts, 99), "mean": float(np.mean(ttfts)) * 1e3 if ttfts else None},
        "itl_ms": {"p50": pct(itls, 50), "p99": pct(itls, 99), "mean": float(np.mean(itls)) * 1e3 if itls else None},
    }
