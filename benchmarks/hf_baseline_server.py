"""The transformers baseline for benchmarks/serving.py: `model.generate` behind a minimal HTTP
server that serves one request at a time (a lock), streaming TGI-style SSE.

    python benchmarks/hf_baseline_server.py --model DIR [--port 8081] [--dtype float32]

Routes (the subset the load generator uses): POST /generate_stream ({"inputs": str,
"parameters": {"max_new_tokens", "do_sample", "temperature", "top_p", "seed"}}), GET /health.
One `data: {"token": {...}, "generated_text": ..., "details": ...}` event per generated token,
from a TextIteratorStreamer that queues every token as it is produced (the stock one holds text
back until a word ends, which would hide the real inter-token latency). A client that disconnects
stops its generation at the next token (a StoppingCriteria), so the next request is not delayed.

One long-lived worker thread loads the model and runs every `generate`, as textgen's engine thread
does: a thread per request (or loading on another thread) would give libgomp several thread teams,
whose throttled spin-waits make every op on 2 cores up to 2x slower, an unfair handicap.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from starlette.responses import StreamingResponse
from transformers import (AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList,
                          TextIteratorStreamer)


class TokenStreamer(TextIteratorStreamer):
    """Yields (token_id, text delta) for every generated token, then ends."""

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        for token_id in value.flatten().tolist():
            self.token_cache.append(token_id)
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            delta = "" if text.endswith("\ufffd") else text[self.print_len:]
            self.print_len += len(delta)
            self.text_queue.put((token_id, delta), timeout=self.timeout)

    def end(self) -> None:
        self.text_queue.put(self.stop_signal, timeout=self.timeout)


class Cancelled(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Baseline:
    def __init__(self, model_dir: str, dtype: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lock = asyncio.Lock()  # one request at a time
        self._jobs: queue.SimpleQueue[tuple[dict[str, Any], threading.Event]] = queue.SimpleQueue()
        loaded = threading.Event()
        threading.Thread(target=self._worker, args=(model_dir, dtype, loaded), daemon=True).start()
        loaded.wait()

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        async with self.lock:
            params = body.get("parameters") or {}
            ids = self.tokenizer(body["inputs"], return_tensors="pt")
            streamer = TokenStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            cancelled = Cancelled()
            kwargs = dict(**ids, max_new_tokens=int(params.get("max_new_tokens") or 20), streamer=streamer,
                          do_sample=bool(params.get("do_sample", False)), stopping_criteria=StoppingCriteriaList([cancelled]),
                          pad_token_id=self.tokenizer.pad_token_id)
            if kwargs["do_sample"]:
                kwargs.update(temperature=params.get("temperature") or 1.0, top_p=params.get("top_p") or 1.0)
                if params.get("seed") is not None:
                    kwargs["seed"] = int(params["seed"])
            done = threading.Event()
            self._jobs.put((kwargs, done))
            try:
                async for event in self._events(streamer):
                    yield event
            finally:
                cancelled.event.set()  # no-op when finished; stops a generation whose client left
                await asyncio.to_thread(done.wait)

    def _worker(self, model_dir: str, dtype: str, loaded: threading.Event) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        loaded.set()
        while True:
            kwargs, done = self._jobs.get()
            seed = kwargs.pop("seed", None)
            try:
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except Exception as exc:  # noqa: BLE001 - end the stream, keep serving
                print(f"generate failed: {type(exc).__name__}: {exc}", flush=True)
                kwargs["streamer"].end()
            finally:
                done.set()

    async def _events(self, streamer: TokenStreamer) -> AsyncIterator[bytes]:
        tokens, text = 0, ""
        iterator = iter(streamer)
        while True:
            item = await asyncio.to_thread(next, iterator, None)
            if item is None:
                break
            token_id, delta = item
            tokens += 1
            text += delta
            token = {"id": token_id, "text": delta, "logprob": None, "special": False}
            yield f"data: {json.dumps({'index': tokens, 'token': token, 'generated_text': None, 'details': None})}\n\n".encode()
        final = {"index": tokens + 1, "token": None, "generated_text": text,
                 "details": {"finish_reason": "length", "generated_tokens": tokens}}
        yield f"data: {json.dumps(final)}\n\n".encode()


def create_app(baseline: Baseline) -> FastAPI:
    app = FastAPI(title="transformers generate baseline (one request at a time)")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        return StreamingResponse(baseline.stream(await request.json()), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import uvicorn

    uvicorn.run(create_app(Baseline(args.model, args.dtype)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
