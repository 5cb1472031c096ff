"""Pure pieces of the API layer, pinned exactly: request defaults, grammar mapping, stop-sequence
trimming for OpenAI streams, SSE keep-alive framing, chat template errors, metrics text."""
from __future__ import annotations

import asyncio

import pytest

from textgen.api.errors import ApiError
from textgen.api.openai_format import StopTrimmer
from textgen.api.schemas_tgi import GenerateParameters, GenerateRequest, GrammarType
from textgen.api.streaming import KEEP_ALIVE, sse_data, with_keep_alive
from textgen.api.validation import Limits, check_best_of, grammar_spec, is_sampling, sampling_params, token_budget
from textgen.core.sampling_params import GrammarSpec

LIMITS = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=1023, max_total_tokens=1024)


def test_parameters_absent_means_sampling_present_means_greedy():
    assert GenerateRequest.model_validate({"inputs": "x"}).parameters.do_sample is True
    assert GenerateRequest.model_validate({"inputs": "x", "parameters": {}}).parameters.do_sample is False


def test_effective_sampling_and_sampling_params():
    assert not is_sampling(GenerateParameters())
    assert not is_sampling(GenerateParameters(temperature=1.0))
    assert is_sampling(GenerateParameters(temperature=0.7))
    assert is_sampling(GenerateParameters(top_k=5))
    p = sampling_params(GenerateParameters(top_p=0.9, stop=["\n"], top_n_tokens=2, decoder_input_details=True), 7, None)
    assert (p.max_new_tokens, p.do_sample, p.top_p, p.temperature, p.stop, p.top_n_tokens, p.prompt_logprobs,
            p.logprobs) == (7, True, 0.9, 1.0, ["\n"], 2, True, True)


def test_token_budget_follows_tgi_chunking():
    assert token_budget(10, None, LIMITS) == 1014  # until max_total_tokens
    big = Limits(2, 4, 5, 4095, 4096)
    assert token_budget(10, 5000, big) == 4086  # the first 1024-token chunk fits; the rest is capped
    assert token_budget(10, 20, LIMITS) == 20
    with pytest.raises(ApiError, match=r"Given: 10 `inputs` tokens and 1024 `max_new_tokens`"):
        token_budget(10, 1020 + 4, LIMITS)


def test_best_of_pre_check():
    assert check_best_of(None, LIMITS) == 1 and check_best_of(0, LIMITS) == 1 and check_best_of(2, LIMITS) == 2
    with pytest.raises(ApiError, match="`best_of` != 1 is not allowed for this endpoint"):
        check_best_of(2, Limits(1, 4, 5, 1023, 1024))


@pytest.mark.parametrize(("grammar", "spec"), [
    ({"type": "regex", "value": "[0-9]+"}, GrammarSpec("regex", "[0-9]+")),
    ({"type": "json", "value": {"properties": {"a": {"type": "integer"}}}},
     GrammarSpec("json", {"properties": {"a": {"type": "integer"}}})),
    ({"type": "json", "value": '{"properties": {}}'}, GrammarSpec("json", {"properties": {}})),
    ({"type": "json_object", "value": {"properties": {}}}, GrammarSpec("json", {"properties": {}})),
    ({"type": "json_object"}, GrammarSpec("json_object")),
    ({"type": "json_schema", "value": {"name": "n", "schema": {"properties": {}}}}, GrammarSpec("json", {"properties": {}})),
    ({"type": "json_schema", "json_schema": {"schema": {"properties": {}}}}, GrammarSpec("json", {"properties": {}})),
    ({"type": "text"}, None),
])
def test_grammar_mapping(grammar, spec):
    assert grammar_spec(GrammarType.model_validate(grammar)) == spec


def test_grammar_refusals():
    with pytest.raises(ApiError, match="grammar is not supported"):
        grammar_spec(GrammarType.model_validate({"type": "regex", "value": "a"}), enabled=False)
    with pytest.raises(ApiError, match="grammar is not valid: .*is not valid under any of the given schemas|"
                                       "grammar is not valid: 3 is not of type"):
        grammar_spec(GrammarType.model_validate({"type": "json", "value": {"type": 3, "properties": {}}}))


def test_stop_trimmer_holds_back_possible_stop_prefixes():
    t = StopTrimmer(["END"])
    assert [t.feed("ab"), t.feed("cE"), t.feed("N"), t.feed("x"), t.feed("E"), t.feed("ND", "END", True)] == \
        ["ab", "c", "", "ENx", "", ""]
    t = StopTrimmer(["\n\n", "###"])
    assert t.feed("a\n") == "a" and t.feed("b") == "\nb" and t.feed("##") == "" and t.feed("x", finished=True) == "##x"
    assert StopTrimmer([]).feed("abc") == "abc"


def test_sse_framing_and_keep_alive():
    async def slow():
        await asyncio.sleep(0.13)
        yield sse_data({"a": "é"})

    async def collect():
        return [chunk async for chunk in with_keep_alive(slow(), 0.05)]

    out = asyncio.run(collect())
    assert out == [KEEP_ALIVE, KEEP_ALIVE, 'data: {"a":"é"}\n\n'.encode()]
    assert KEEP_ALIVE == b":\n\n"


def test_chat_template_errors(tiny_llama):
    from transformers import AutoTokenizer

    from textgen.api.chat_template import render_chat
    from textgen.api.schemas_openai import ChatMessage

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    msgs = [ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "image_url",
                                                                           "image_url": {"url": "http://x/i.png"}}])]
    assert render_chat(tok, msgs) == "<s>user\na![](http://x/i.png)</s>\n<s>assistant\n"
    cont = render_chat(tok, msgs + [ChatMessage(role="assistant", content="def f")])
    assert cont.endswith("<s>assistant\ndef f")  # continued, not closed
    tok.chat_template = "{{ raise_exception('system messages are not supported') }}"
    with pytest.raises(ApiError) as err:
        render_chat(tok, msgs)
    assert (err.value.status, err.value.message, err.value.error_type) == (
        422, "Template error: system messages are not supported", "template_error")
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ApiError, match="^Template error: "):
        render_chat(tok, msgs)
    tok.chat_template = None
    with pytest.raises(ApiError, match="^Template error: template not found$"):
        render_chat(tok, msgs)


def test_metrics_text_uses_tgi_counter_names():
    from textgen.api.metrics import Metrics
    from textgen.core.engine.types import EngineStats

    stats = EngineStats(num_waiting=2, num_running=3, kv_cache_usage=0.25, prefix_cache_queries=40,
                        prefix_cache_hits=10, batch_max_tokens=64, num_kv_blocks=8, block_size=16)
    m = Metrics(1023, 1024, 2048, lambda: stats)
    m.request()
    m.failure("overloaded")
    text = m.render().decode()
    assert "\ntgi_request_count 1.0\n" in "\n" + text
    assert 'tgi_request_failure{err="overloaded"} 1.0' in text and 'tgi_request_failure{err="template"} 0.0' in text
    for line in ("tgi_queue_size 2.0", "tgi_batch_current_size 3.0", "tgi_batch_current_max_tokens 64.0",
                 "tgi_batch_max_total_tokens 2048.0", "textgen_kv_cache_usage 0.25", "textgen_prefix_cache_hit_rate 0.25"):
        assert f"\n{line}\n" in text, line


def test_step_records_feed_tgi_batch_series():
    from textgen.api.metrics import Metrics
    from textgen.core.engine.types import EngineStats, StepRecord

    stats = EngineStats(0, 0, 0.0, 0, 0, 0, 8, 16)
    m = Metrics(1023, 1024, 2048, lambda: stats)
    m.step(StepRecord("prefill", 3, 40, True, 0.001, 0.02, 0.002, 0.003, False))
    m.step(StepRecord("decode", 2, 2, False, 0.001, 0.01, 0.001, 0.001, True, model_s=0.008, loop_s=0.002))
    text = m.render().decode()
    for line in ('tgi_batch_inference_count{method="prefill"} 1.0', 'tgi_batch_inference_success{method="prefill"} 1.0',
                 'tgi_batch_inference_failure{method="decode"} 1.0', 'tgi_batch_inference_success{method="decode"} 0.0',
                 'tgi_batch_concat{reason="chunking"} 1.0', 'tgi_batch_concat{reason="backpressure"} 0.0',
                 'tgi_batch_next_size_bucket{le="2.0"} 1.0', 'tgi_batch_next_size_bucket{le="3.0"} 2.0',
                 'tgi_batch_forward_duration_sum{method="prefill"} 0.02',
                 'tgi_batch_inference_duration_sum{method="prefill"} 0.026',
                 'tgi_batch_filter_duration_sum{method="decode"} 0.001',
                 'tgi_batch_decode_duration_sum{method="prefill"} 0.003',
                 'tgi_batch_concat_duration_count{method="decode"} 1.0'):
        assert f"\n{line}\n" in text, line
    # the overhead attribution: step = loop + schedule + forward + filter + decode; overhead = step - model
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("textgen_batch_"))
    for name, want in (('textgen_batch_step_duration_sum{method="decode"}', 0.015),
                       ('textgen_batch_model_forward_duration_sum{method="decode"}', 0.008),
                       ('textgen_batch_overhead_duration_sum{method="decode"}', 0.007),
                       ('textgen_batch_overhead_duration_sum{method="prefill"}', 0.026),
                       ('textgen_batch_step_duration_count{method="prefill"}', 1.0)):
        assert float(values[name]) == pytest.approx(want), name


def test_extra_metrics_listener_and_json_logs():
    import json
    import logging

    import httpx

    from textgen.api.metrics import Metrics
    from textgen.api.observability import JsonFormatter, start_metrics_listener
    from textgen.core.engine.types import EngineStats

    stats = EngineStats(0, 0, 0.0, 0, 0, 0, 8, 16)
    m = Metrics(10, 20, 40, lambda: stats)
    m.request()
    listener = start_metrics_listener(m, "127.0.0.1", 0)
    try:
        text = httpx.get(f"http://127.0.0.1:{listener.server_address[1]}/metrics", timeout=10).text
    finally:
        listener.shutdown()
    assert "\ntgi_request_count 1.0\n" in text
    record = logging.LogRecord("textgen.api", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["target"], entry["fields"]) == ("WARNING", "textgen.api", {"message": "hello world"})
