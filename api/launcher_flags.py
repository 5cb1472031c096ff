"""`textgen serve` flags: TGI's launcher flags (reference §3.1) with their environment variables.

A value comes from the command line, else from the flag's environment variable, else from its
default (TGI's clap `env` rule). Flags without effect in textgen yet are accepted, so TGI command
lines and container environments keep working; the ones that cannot be honoured are refused by
`launcher.check_options` with a message that names the limit.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

QUANTIZE_METHODS = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                    "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8", "int8", "int4")  # int8/int4: textgen's CPU weight-only
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("fp8_e4m3fn", "fp8_e5m2")


class FlagError(ValueError):
    """A value that cannot be parsed; the message names the flag or variable."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """TGI's --cuda-graphs: "1,2,4" -> (1, 2, 4); "0" -> () (graph mode off)."""
    sizes = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    if any(size < 0 for size in sizes):
        raise ValueError("batch sizes must be >= 0")
    return tuple(sorted(set(s for s in sizes if s > 0)))


def _default_model_id() -> str | None:
    try:
        from textgen.demo import DEMO_MODEL_PATH
    except ImportError:
        return None
    return DEMO_MODEL_PATH


@dataclass(frozen=True, slots=True)
class Flag:
    name: str  # --kebab-case
    env: str | None
    type: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    kind: str = "value"  # value | switch (bare flag, or true/false) | list (repeatable; env comma-separated)
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("model-id", "MODEL_ID", help="Hugging Face hub id or local folder (default: the bundled demo model)"),
    Flag("revision", "REVISION", help="model revision (branch, tag or commit) on the hub"),
    Flag("validation-workers", "VALIDATION_WORKERS", int, 2, "threads for tokenization and chat templates"),
    Flag("sharded", "SHARDED", parse_bool, None, "shard the model (needs --num-shard > 1)", "switch"),
    Flag("num-shard", "NUM_SHARD", int, None, "tensor-parallel ranks on this node (also SM_NUM_GPUS; see README)"),
    Flag("quantize", "QUANTIZE", str, None, "quantization method", choices=QUANTIZE_METHODS),
    Flag("speculate", "SPECULATE", int, None, "speculative decoding: draft tokens verified per step, by n-gram "
         "prompt lookup (or the model given by --speculative-model)"),
    Flag("speculative-model", "SPECULATIVE_MODEL", str, None,
         "draft model (hub id or folder, the target's tokenizer) for --speculate; default: n-gram lookup"),
    Flag("dtype", "DTYPE", str, None, "weights dtype", choices=DTYPES),
    Flag("trust-remote-code", "TRUST_REMOTE_CODE", parse_bool, False, "allow custom modeling code from the hub", "switch"),
    Flag("max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", int, 128, "requests in flight before 429"),
    Flag("max-best-of", "MAX_BEST_OF", int, 2, "largest best_of (and OpenAI n)"),
    Flag("max-stop-sequences", "MAX_STOP_SEQUENCES", int, 4, "most stop sequences per request"),
    Flag("max-top-n-tokens", "MAX_TOP_N_TOKENS", int, 5, "largest top_n_tokens / top_logprobs"),
    Flag("max-input-tokens", "MAX_INPUT_TOKENS", int, None, "longest prompt (default: max-total-tokens - 1)"),
    Flag("max-input-length", "MAX_INPUT_LENGTH", int, None, "legacy name of --max-input-tokens"),
    Flag("max-total-tokens", "MAX_TOTAL_TOKENS", int, None, "prompt + generation limit (default: from the KV cache and model)"),
    Flag("waiting-served-ratio", "WAITING_SERVED_RATIO", float, 0.3, "accepted; prefill chunking makes it moot"),
    Flag("max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", int, None, "prefill tokens per engine step"),
    Flag("max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", int, None, "tokens the KV cache holds (default: from memory)"),
    Flag("max-waiting-tokens", "MAX_WAITING_TOKENS", int, 20, "accepted for compatibility"),
    Flag("max-batch-size", "MAX_BATCH_SIZE", int, None, "requests per engine step"),
    Flag("hostname", "HOSTNAME", str, "0.0.0.0", "address to listen on"),
    Flag("port", "PORT", int, 3000, "HTTP port"),
    Flag("prometheus-port", "PROMETHEUS_PORT", int, None, "extra /metrics listener (metrics are always on the main port)"),
    Flag("grpc-port", "GRPC_PORT", int, None, "serve the gRPC service (textgen.v1.TextGeneration) on this port"),
    Flag("json-output", "JSON_OUTPUT", parse_bool, False, "log as JSON lines", "switch"),
    Flag("otlp-endpoint", "OTLP_ENDPOINT", str, None, "OTLP/gRPC endpoint for traces"),
    Flag("otlp-service-name", "OTLP_SERVICE_NAME", str, "text-generation-inference.router", "service name in traces"),
    Flag("cors-allow-origin", "CORS_ALLOW_ORIGIN", str, None, "allowed CORS origin (repeatable; default any)", "list"),
    Flag("api-key", "API_KEY", str, None, "require `Authorization: Bearer <key>` on generation routes"),
    Flag("disable-grammar-support", "DISABLE_GRAMMAR_SUPPORT", parse_bool, False, "refuse grammar / response_format", "switch"),
    Flag("max-client-batch-size", "MAX_CLIENT_BATCH_SIZE", int, 4, "most prompts in one /v1/completions request"),
    Flag("payload-limit", "PAYLOAD_LIMIT", int, 2_000_000, "largest request body in bytes (413 above)"),
    Flag("master-addr", "MASTER_ADDR", str, "localhost", "address of rank 0's torch.distributed store"),
    Flag("master-port", "MASTER_PORT", int, 29500, "port of rank 0's torch.distributed store"),
    Flag("backend", "TEXTGEN_BACKEND", str, None, "force a backend plugin (see `textgen backends`)"),
    Flag("block-size", "BLOCK_SIZE", int, None, "tokens per KV cache block (default: the attention kernel's preferred size)"),
    Flag("attention-backend", "TEXTGEN_ATTENTION_BACKEND", str, None,
         "force an attention kernel by name (startup lists the offered ones and why each was not used)"),
    Flag("kv-cache-dtype", "KV_CACHE_DTYPE", str, None, "store the KV cache in fp8 (compute stays in --dtype)",
         choices=KV_CACHE_DTYPES),
    Flag("cuda-graphs", "CUDA_GRAPHS", parse_batch_sizes, None,
         "decode batch sizes run as captured/compiled graphs, comma-separated; 0 disables "
         "(default: the backend's; CUDA 1,2,4,8,16,32, CPU off)"),
    Flag("cuda-memory-fraction", "CUDA_MEMORY_FRACTION", float, None,
         "fraction of device memory textgen may use; the KV cache gets what the profile run leaves "
         "(default 1.0 on accelerators; on CPU unset keeps the 4 GiB / TEXTGEN_CPU_KV_CACHE_GB cap)"),
    Flag("num-kv-blocks", "NUM_KV_BLOCKS", int, None, "KV cache blocks (default: from memory)"),
    Flag("prefix-caching", "PREFIX_CACHING", parse_bool, True, "reuse the KV cache of shared prompt prefixes (true/false)"),
    Flag("lora-adapters", "LORA_ADAPTERS", str, None,
         "LoRA adapters to serve, comma-separated: `name=path`, `hub/id` or `hub/id@revision`"),
    Flag("max-loras", "MAX_LORAS", int, 8, "LoRA adapters resident at once; the others load on demand (LRU)"),
    Flag("max-lora-rank", "MAX_LORA_RANK", int, 16, "largest LoRA rank an adapter may have"),
    Flag("allow-runtime-lora-updating", "ALLOW_RUNTIME_LORA_UPDATING", parse_bool, False,
         "mount POST /v1/load_lora_adapter and /v1/unload_lora_adapter", "switch"),
    Flag("log-level", "LOG_LEVEL", str, "info", "debug, info, warning or error"),
    Flag("kv-events-endpoint", "KV_EVENTS_ENDPOINT", str, None, "publish KV-cache events over ZMQ in vLLM's format (tcp://*:5557 binds, tcp://host:port connects)"),
    Flag("kv-events-topic", "KV_EVENTS_TOPIC", str, "", "ZMQ topic of the KV-cache events (llm-d: kv@<pod-ip>@<model>)"),
    Flag("shutdown-timeout", "SHUTDOWN_TIMEOUT", float, 30.0, "seconds a SIGTERM/SIGINT drain waits for requests in flight"),
    Flag("watchdog-timeout", "WATCHDOG_TIMEOUT", float, 60.0, "/health fails when no engine step completes for this many seconds while requests are open"),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to None here so `resolve` can tell 'not given' from a value."""
    for flag in FLAGS:
        env = f" [env: {flag.env}]" if flag.env else ""
        default = f" [default: {flag.default}]" if flag.default is not None else ""
        help_text = f"{flag.help}{env}{default}"
        names = [f"--{flag.name}"] + (["-p"] if flag.name == "port" else [])
        if flag.kind == "switch":
            parser.add_argument(*names, dest=flag.dest, nargs="?", const="true", default=None, help=help_text,
                                metavar="BOOL")
        elif flag.kind == "list":
            parser.add_argument(*names, dest=flag.dest, action="append", default=None, help=help_text)
        else:
            parser.add_argument(*names, dest=flag.dest, default=None, help=help_text, choices=flag.choices)


def _convert(flag: Flag, raw: str, source: str) -> Any:
    if flag.choices is not None and raw not in flag.choices:
        raise FlagError(f"invalid value {raw!r} for {source} (choose from {', '.join(flag.choices)})")
    try:
        return flag.type(raw)
    except ValueError as exc:
        raise FlagError(f"invalid value {raw!r} for {source}: {exc}") from None


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Flag values by dest: command line, else environment variable, else default. Raises FlagError."""
    values: dict[str, Any] = {}
    for flag in FLAGS:
        given = getattr(args, flag.dest, None)
        if flag.kind == "list":
            items = given if given is not None else _env_list(environ.get(flag.env or ""))
            values[flag.dest] = [_convert(flag, v, f"--{flag.name}") for v in items]
        elif given is not None:
            values[flag.dest] = _convert(flag, str(given), f"--{flag.name}")
        elif flag.env and environ.get(flag.env) not in (None, ""):
            values[flag.dest] = _convert(flag, environ[flag.env], flag.env)
        else:
            values[flag.dest] = flag.default
    if values["model_id"] is None:
        values["model_id"] = _default_model_id()
    if getattr(args, "num_shard", None) is None and environ.get("SM_NUM_GPUS") not in (None, ""):
        flag = next(f for f in FLAGS if f.dest == "num_shard")  # SageMaker: TGI's entrypoint exports it as NUM_SHARD
        values["num_shard"] = _convert(flag, environ["SM_NUM_GPUS"], "SM_NUM_GPUS")
    return values


def _env_list(raw: str | None) -> list[str]:
    return [v.strip() for v in (raw or "").split(",") if v.strip()]
