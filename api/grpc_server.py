"""The public gRPC service `textgen.v1.TextGeneration` (api/proto/textgen.proto), served by
grpc.aio on the HTTP server's event loop, over the same validation, engine and metrics as the
HTTP routes. A cancelled call (client gone, deadline) cancels its handler, which closes the
engine iterator and so aborts the request."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from pydantic import ValidationError

from textgen.api.errors import ApiError, describe_validation_errors, deserialize_error
from textgen.api.proto import textgen_pb2 as pb
from textgen.api.proto import textgen_pb2_grpc as pb_grpc
from textgen.api.routes_info import unhealthy_reason
from textgen.api.routes_tgi import generate_json, tgi_stream
from textgen.api.schemas_tgi import GenerateRequest, default_parameters
from textgen.api.state import AppState

log = logging.getLogger("textgen.grpc")

_STATUS = {422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           424: grpc.StatusCode.INTERNAL, 500: grpc.StatusCode.INTERNAL}
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos_token": pb.FINISH_REASON_EOS_TOKEN,
           "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE}
_OPTIONAL = ("best_of", "temperature", "repetition_penalty", "frequency_penalty", "top_k", "top_p", "typical_p",
             "max_new_tokens", "truncate", "seed", "top_n_tokens")
_PLAIN = ("do_sample", "return_full_text", "watermark", "details", "decoder_input_details")


def request_body(msg: pb.GenerateRequest) -> GenerateRequest:
    """proto -> the HTTP body model, so both transports share one validation."""
    if not msg.HasField("parameters"):
        return GenerateRequest(inputs=msg.inputs, parameters=default_parameters())
    p = msg.parameters
    params: dict[str, Any] = {name: getattr(p, name) for name in _OPTIONAL if p.HasField(name)}
    params.update({name: getattr(p, name) for name in _PLAIN})
    params["stop"] = list(p.stop)
    if p.HasField("grammar") and p.grammar.type != pb.GRAMMAR_TYPE_NONE:
        kind = "regex" if p.grammar.type == pb.GRAMMAR_TYPE_REGEX else "json"
        value = p.grammar.value if kind == "regex" else _json_or_text(p.grammar.value)
        params["grammar"] = {"type": kind, "value": value}
    for name in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"):
        if name in params:  # proto floats are f32: keep the value the client wrote (0.95, not 0.949999988)
            params[name] = float(f"{params[name]:.7g}")
    try:
        return GenerateRequest.model_validate({"inputs": msg.inputs, "parameters": params})
    except ValidationError as exc:
        raise deserialize_error(describe_validation_errors(list(exc.errors()))) from None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _token(d: dict[str, Any]) -> pb.Token:
    token = pb.Token(id=d["id"], text=d["text"], special=d.get("special", False))
    if d.get("logprob") is not None:
        token.logprob = d["logprob"]
    return token


def _details(d: dict[str, Any], input_length: int) -> pb.Details:
    details = pb.Details(finish_reason=_FINISH[d["finish_reason"]], generated_tokens=d["generated_tokens"],
                         prefill=[_token(t) for t in d.get("prefill", [])], tokens=[_token(t) for t in d.get("tokens", [])],
                         top_tokens=[pb.TopTokens(tokens=[_token(t) for t in step]) for step in d.get("top_tokens", [])],
                         input_length=input_length)
    if d.get("seed") is not None:
        details.seed = d["seed"]
    return details


def generate_response(body: dict[str, Any], input_length: int) -> pb.GenerateResponse:
    out = pb.GenerateResponse(generated_text=body["generated_text"])
    if "details" in body:
        out.details.CopyFrom(_details(body["details"], input_length))
        for seq in body["details"].get("best_of_sequences", []):
            out.best_of_sequences.add(generated_text=seq["generated_text"], details=_details(seq, input_length))
    return out


def stream_response(event: dict[str, Any]) -> pb.GenerateStreamResponse:
    out = pb.GenerateStreamResponse(index=event["index"], token=_token(event["token"]),
                                    top_tokens=[_token(t) for t in event.get("top_tokens", [])])
    if event["generated_text"] is not None:
        out.generated_text = event["generated_text"]
    if event["details"] is not None:
        out.details.CopyFrom(_details(event["details"], event["details"]["input_length"]))
    return out


class TextGenerationService(pb_grpc.TextGenerationServicer):
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ApiError) -> None:
        context.set_trailing_metadata((("error-type", exc.error_type),))
        await context.abort(_STATUS.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:  # noqa: N802
        try:
            body = request_body(request)
            payload, headers = await generate_json(self.state, None, body, body.parameters.return_full_text or False)
        except ApiError as exc:
            await self._abort(context, exc)
        return generate_response(payload, int(headers["x-prompt-tokens"]))

    async def GenerateStream(self, request: pb.GenerateRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            body = request_body(request)
            events = tgi_stream(self.state, body, body.parameters.return_full_text or False)
            try:
                async for event in events:
                    yield stream_response(event)
            finally:
                await events.aclose()
        except ApiError as exc:
            await self._abort(context, exc)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:  # noqa: N802
        e, c = self.state.engine, self.state.engine.config
        return pb.InfoResponse(
            model_id=self.state.model_id, model_dtype=e.dtype, model_device_type=e.device, backend=e.backend_name,
            max_concurrent_requests=c.max_concurrent_requests, max_best_of=c.max_best_of,
            max_stop_sequences=c.max_stop_sequences, max_input_tokens=c.max_input_tokens,
            max_total_tokens=c.max_total_tokens, max_top_n_tokens=c.max_top_n_tokens, version=self.state.version)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:  # noqa: N802
        reason = await unhealthy_reason(self.state)
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"unhealthy: {reason}")
        return pb.HealthResponse()


async def start_grpc_server(state: AppState, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServicer_to_server(TextGenerationService(state), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    log.info("gRPC service textgen.v1.TextGeneration listening on %s:%d", host, bound)
    return server
