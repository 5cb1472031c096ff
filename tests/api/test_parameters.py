"""Every TGI and OpenAI generation parameter end to end through HTTP, against transformers: logprobs
(generated, prompt, top-n, OpenAI's shapes), TGI's implicit sampling, seeds alone and inside one
concurrent mixed batch, stop sequences spanning tokens, best_of / n, penalties in TGI's and OpenAI's
meanings, logit_bias, watermark, max_new_tokens defaults, truncate, and every validation message."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.api.conftest import sse_events
from tests.engine.test_parameters import PROMPTS, TOL, Processing, Reference, green_fraction

V = "Input validation error: "


@pytest.fixture(scope="module")
def ref(tiny_llama) -> Reference:
    return Reference(tiny_llama)


@pytest.fixture(scope="module")
def tok(server):
    return server.engine.tokenizer


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def generate(server, inputs: str, **params) -> dict:
    return post(server, "/generate", {"inputs": inputs, "parameters": {"details": True, **params}})


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def chat(server, content: str, **body) -> dict:
    return post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **body})


def ids_of(details: dict) -> list[int]:
    return [t["id"] for t in details["tokens"]]


# -- logprobs against transformers ---------------------------------------------------------------


def test_generate_logprobs_prefill_and_top_tokens_equal_transformers(server, ref, tok):
    ids = tok.encode(PROMPTS[0])
    d = generate(server, PROMPTS[0], max_new_tokens=8, decoder_input_details=True, top_n_tokens=3)["details"]
    want, lps, dists = ref.generate(ids, 8)
    assert ids_of(d) == want and d["seed"] is None
    assert [t["logprob"] for t in d["tokens"]] == pytest.approx(lps, abs=TOL)
    assert [t["id"] for t in d["prefill"]] == ids and d["prefill"][0]["logprob"] is None
    assert [t["logprob"] for t in d["prefill"][1:]] == pytest.approx(ref.prompt_logprobs(ids), abs=TOL)
    for step, dist in zip(d["top_tokens"], dists):
        values, index = dist.topk(3)
        assert [t["id"] for t in step] == index.tolist()
        assert [t["logprob"] for t in step] == pytest.approx(values.tolist(), abs=TOL)


def test_chat_logprobs_equal_transformers(server, ref, tok):
    body = chat(server, PROMPTS[1], temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    want, lps, dists = ref.generate(chat_ids(tok, PROMPTS[1]), 6)
    content = body["choices"][0]["logprobs"]["content"]
    assert [list(c) for c in content] == [["token", "logprob", "bytes", "top_logprobs"]] * 6
    assert [c["logprob"] for c in content] == pytest.approx(lps, abs=TOL)
    # TGI's token texts: a token that ends inside a UTF-8 character has "", the next one carries it
    assert "".join(c["token"] for c in content) == tok.decode(want) == body["choices"][0]["message"]["content"]
    for c, dist in zip(content, dists):
        values, index = dist.topk(2)
        assert c["bytes"] == list(c["token"].encode())
        assert [t["token"] for t in c["top_logprobs"]] == [tok.decode([i]) for i in index.tolist()]
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx(values.tolist(), abs=TOL)


def test_completions_echo_with_logprobs_equal_transformers(server, ref, tok):
    prompt = PROMPTS[0]
    ids = tok.encode(prompt)
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2,
                                            "echo": True})
    (choice,) = body["choices"]
    want, lps, dists = ref.generate(ids, 5)
    generated = tok.decode(want)
    assert choice["text"] == prompt + generated
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids + want]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(ref.prompt_logprobs(ids) + lps, abs=TOL)
    for top, dist in zip(lp["top_logprobs"][len(ids):], dists):
        values, index = dist.topk(2)
        assert list(top) == [tok.decode([i]) for i in index.tolist()]  # the chosen token is the top one
        assert list(top.values()) == pytest.approx(values.tolist(), abs=TOL)
    text, offsets = choice["text"], lp["text_offset"]
    assert offsets[0] == offsets[1] == 0  # BOS is special: no characters
    assert all(text[o: o + len(t)] == t for o, t in zip(offsets[1:], lp["tokens"][1:]))
    assert offsets[len(ids)] == len(prompt)
    plain = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 0})
    p = plain["choices"][0]
    assert p["text"] == generated and p["logprobs"]["text_offset"][0] == 0
    assert p["logprobs"]["token_logprobs"] == pytest.approx(lps, abs=TOL)
    assert [list(t) for t in p["logprobs"]["top_logprobs"]] == [[tok.decode([i])] for i in want]


def test_completions_stream_echoes_the_prompt_first(server, tok):
    body = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r.read().decode().split("\n")) if e != "[DONE]"]
    full = post(server, "/v1/completions", {**body, "stream": False})["choices"][0]
    chunks = [e["choices"][0] for e in events]
    assert chunks[0]["text"].startswith(PROMPTS[2]) and "".join(c["text"] for c in chunks) == full["text"]
    streamed = {key: [v for c in chunks for v in c["logprobs"][key]] for key in full["logprobs"]}
    assert (streamed["tokens"], streamed["text_offset"]) == (full["logprobs"]["tokens"], full["logprobs"]["text_offset"])
    assert streamed["token_logprobs"][0] is None and full["logprobs"]["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:], abs=TOL)


# -- sampling switches, seeds and mixed batches --------------------------------------------------


@pytest.mark.parametrize("warper", [{"temperature": 0.5}, {"top_k": 10}, {"top_p": 0.5}, {"typical_p": 0.5}])
def test_a_warper_alone_makes_tgi_sample(server, ref, tok, warper):
    """do_sample is false, yet TGI's shard samples (temperature != 1, top_k, top_p < 1, typical_p
    < 1): the seed is reported and the tokens are the reference sampler's for that seed."""
    d = generate(server, PROMPTS[3], max_new_tokens=6, seed=31, **warper)["details"]
    assert d["seed"] == 31
    assert ids_of(d) == ref.generate(tok.encode(PROMPTS[3]), 6, Processing(**warper), seed=31)[0]


def test_temperature_one_without_do_sample_is_greedy(server, ref, tok):
    d = generate(server, PROMPTS[3], max_new_tokens=6, temperature=1.0, seed=31)["details"]
    assert d["seed"] is None and ids_of(d) == ref.generate(tok.encode(PROMPTS[3]), 6)[0]


def test_seeds_reproduce_alone_and_inside_a_concurrent_mixed_batch(server):
    seeded = [
        ("/generate", {"inputs": PROMPTS[0], "parameters": {"do_sample": True, "seed": 99, "temperature": 0.8,
                                                             "top_k": 30, "max_new_tokens": 12}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[1]}], "seed": 5, "max_tokens": 12,
                                  "top_p": 0.9, "frequency_penalty": 0.5}),
        ("/v1/completions", {"prompt": PROMPTS[2], "seed": 6, "max_tokens": 12, "n": 2, "presence_penalty": 1.0,
                             "logit_bias": {"17": 2.0}}),
    ]
    others = [
        ("/generate", {"inputs": PROMPTS[1], "parameters": {"repetition_penalty": 1.5, "frequency_penalty": 1.0,
                                                             "max_new_tokens": 9, "top_n_tokens": 2}}),
        ("/generate", {"inputs": PROMPTS[2], "parameters": {"watermark": True, "do_sample": True,
                                                             "max_new_tokens": 15, "decoder_input_details": True}}),
        ("/generate", {"inputs": PROMPTS[3], "parameters": {"best_of": 2, "typical_p": 0.8, "max_new_tokens": 7,
                                                             "stop": ["e"], "truncate": 3}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}], "n": 2, "max_tokens": 10,
                                  "logit_bias": {"5": 100}, "logprobs": True, "top_logprobs": 3}),
        ("/v1/completions", {"prompt": [PROMPTS[3], PROMPTS[0]], "temperature": 0, "max_tokens": 8, "echo": True,
                             "logprobs": 2}),
    ]

    async def send(requests):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    def texts(response: httpx.Response) -> list[str]:
        body = response.json()
        if "generated_text" in body:
            return [body["generated_text"]]
        return [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]

    alone = [texts(asyncio.run(send([request]))[0]) for request in seeded]
    mixed = asyncio.run(send(others[:2] + seeded + others[2:]))
    assert all(r.status_code == 200 for r in mixed), [r.text for r in mixed if r.status_code != 200]
    assert [texts(r) for r in mixed[2:5]] == alone
    n_choices = alone[2]
    assert len(n_choices) == 2 and n_choices[0] != n_choices[1]  # n: independent sampled choices
    reseeded = post(server, "/v1/completions", {**seeded[2][1], "seed": 7})
    assert [c["text"] for c in reseeded["choices"]] != n_choices


# -- stop sequences ------------------------------------------------------------------------------


def _spanning_stop(tokens: list[str]) -> tuple[str, int]:
    """A stop string made of the end of one token, the whole next one and the start of the one
    after (three tokens), whose first occurrence in the text is there; returns (stop, its end)."""
    text = "".join(tokens)
    for k in range(len(tokens) - 2):
        a, b, c = tokens[k: k + 3]
        stop = a[-2:] + b + c[:1]
        start = len("".join(tokens[:k + 1])) - len(a[-2:])
        if len(a) >= 2 and b and c and text.find(stop) == start:
            return stop, start + len(stop)
    raise AssertionError(f"no usable token boundary in {tokens!r}")


def test_stop_sequence_spanning_three_tokens(server, tok):
    full = generate(server, PROMPTS[0], max_new_tokens=16)
    stop, end = _spanning_stop([t["text"] for t in full["details"]["tokens"]])
    text = full["generated_text"]
    tgi = generate(server, PROMPTS[0], max_new_tokens=16, stop=["never there", stop])
    assert tgi["generated_text"] == text[:end] and tgi["generated_text"].endswith(stop)  # TGI keeps it
    assert tgi["details"]["finish_reason"] == "stop_sequence"
    assert ids_of(tgi["details"]) == ids_of(full["details"])[:tgi["details"]["generated_tokens"]]
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": stop}
    (choice,) = post(server, "/v1/completions", body)["choices"]
    assert (choice["text"], choice["finish_reason"]) == (text[: end - len(stop)], "stop")  # OpenAI trims it
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r.read().decode().split("\n")) if e != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == text[: end - len(stop)]
    reply = chat(server, PROMPTS[0], temperature=0, max_tokens=16, logprobs=True)["choices"][0]
    stop, end = _spanning_stop([c["token"] for c in reply["logprobs"]["content"]])
    stopped = chat(server, PROMPTS[0], temperature=0, max_tokens=16, stop=[stop])["choices"][0]
    assert stopped["message"]["content"] == reply["message"]["content"][: end - len(stop)]
    assert stopped["finish_reason"] == "stop"


# -- best_of and n -------------------------------------------------------------------------------


def test_best_of_returns_the_best_mean_logprob_and_the_others(server):
    body = generate(server, PROMPTS[1], max_new_tokens=8, best_of=2, do_sample=True, return_full_text=True)
    d = body["details"]
    (other,) = d["best_of_sequences"]
    mean = lambda seq: sum(t["logprob"] for t in seq["tokens"]) / len(seq["tokens"])  # noqa: E731
    assert mean(d) >= mean(other) and d["seed"] != other["seed"]
    assert body["generated_text"] != other["generated_text"]
    assert body["generated_text"].startswith(PROMPTS[1]) and other["generated_text"].startswith(PROMPTS[1])


def test_chat_n_gives_independent_choices(server):
    body = chat(server, PROMPTS[2], n=2, max_tokens=8)
    a, b = (c["message"]["content"] for c in body["choices"])
    assert [c["index"] for c in body["choices"]] == [0, 1] and a != b
    assert body["usage"]["completion_tokens"] == 16
    greedy = chat(server, PROMPTS[2], n=2, max_completion_tokens=3, temperature=0)
    assert greedy["usage"]["completion_tokens"] == 6
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]


# -- penalties and logit_bias --------------------------------------------------------------------


def test_penalties_follow_tgi_and_openai_formulas(server, ref, tok):
    """TGI's frequency_penalty (count in prompt + output / length) on /generate, OpenAI's
    frequency/presence penalties (count in the output) on the OpenAI routes; each changes the
    greedy output and gives exactly the reference's tokens and logprobs."""
    ids, cids = tok.encode(PROMPTS[0]), chat_ids(tok, PROMPTS[0])
    plain, cplain = ref.generate(ids, 12)[0], ref.generate(cids, 12)[0]
    for params, proc in (({"repetition_penalty": 1.8}, Processing(repetition_penalty=1.8)),
                         ({"frequency_penalty": 1.5}, Processing(tgi_frequency_penalty=1.5))):
        tokens = generate(server, PROMPTS[0], max_new_tokens=12, **params)["details"]["tokens"]
        want, lps, _ = ref.generate(ids, 12, proc)
        assert [t["id"] for t in tokens] == want and want != plain, params
        assert [t["logprob"] for t in tokens] == pytest.approx(lps, abs=TOL)
    for key in ("frequency_penalty", "presence_penalty"):
        body = chat(server, PROMPTS[0], temperature=0, max_tokens=12, logprobs=True, **{key: 1.5})
        content = body["choices"][0]["logprobs"]["content"]
        want, lps, _ = ref.generate(cids, 12, Processing(**{key: 1.5}))
        # an unfinished UTF-8 character at the end is not text yet
        assert "".join(c["token"] for c in content) == tok.decode(want).rstrip("\ufffd") and want != cplain, key
        assert [c["logprob"] for c in content] == pytest.approx(lps, abs=TOL)


def test_logit_bias_plus_100_forces_and_minus_100_bans(server, tok):
    forced = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 6, "logit_bias": {"17": 100}})
    assert forced["choices"][0]["text"] == tok.decode([17] * 6)
    content = chat(server, PROMPTS[1], max_tokens=5, logit_bias={"17": 100}, logprobs=True)["choices"][0]
    assert [c["token"] for c in content["logprobs"]["content"]] == [tok.decode([17])] * 5
    greedy = generate(server, PROMPTS[1], max_new_tokens=6)
    first = greedy["details"]["tokens"][0]["id"]
    banned = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 0,
                                              "logit_bias": {str(first): -100}})["choices"][0]
    assert tok.decode([first]) not in banned["logprobs"]["tokens"] and banned["text"] != greedy["generated_text"]


# -- watermark -----------------------------------------------------------------------------------


def test_watermark_puts_most_tokens_in_the_greenlist(server, tok):
    """Default WATERMARK_GAMMA 0.5 / WATERMARK_DELTA 2 on a 1000-token vocabulary, 120 sampled tokens."""
    from textgen.core.sampling import WatermarkConfig

    gamma = WatermarkConfig.from_env().gamma
    ids = tok.encode(PROMPTS[2])
    params = {"max_new_tokens": 120, "do_sample": True, "seed": 4}  # a seed whose runs do not end on EOS
    marked = ids_of(generate(server, PROMPTS[2], watermark=True, **params)["details"])
    plain = ids_of(generate(server, PROMPTS[2], **params)["details"])
    assert len(marked) == 120 and len(plain) == 120
    assert green_fraction(ids, marked, 1000, gamma) > gamma + 0.25
    assert abs(green_fraction(ids, plain, 1000, gamma) - gamma) < 0.15


# -- lengths and truncation ----------------------------------------------------------------------


def test_omitted_max_new_tokens_runs_to_max_total_tokens(server, tok):
    long_text = "x = 1\n" * 400
    d = generate(server, long_text, truncate=1000, decoder_input_details=True)["details"]
    assert [t["id"] for t in d["prefill"]] == tok.encode(long_text)[-1000:]  # truncate keeps the last tokens
    assert (d["generated_tokens"], d["finish_reason"]) == (1024 - 1000, "length")
    body = post(server, "/v1/completions", {"prompt": "x = 1\n" * 245, "temperature": 0})  # 981 tokens
    assert body["usage"] == {"prompt_tokens": 981, "completion_tokens": 1024 - 981, "total_tokens": 1024}
    assert body["choices"][0]["finish_reason"] == "length"


# -- validation ----------------------------------------------------------------------------------

TGI_INVALID = [  # /generate parameters not pinned by test_errors.py
    ({"temperature": -0.5}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": -3}, "`top_k` must be strictly positive"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "top_k": 0}, "`top_k` must be strictly positive"),  # top_k set: sampling asked
]

OPENAI_INVALID = [  # (route, body, message); chat bodies get `messages`, completions `prompt`
    ("chat", {"temperature": -1.0}, "`temperature` must be strictly positive"),
    ("chat", {"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ("chat", {"frequency_penalty": 2.5, "presence_penalty": 3.0}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("chat", {"presence_penalty": -2.5, "logit_bias": {"5": 101}}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ("chat", {"logit_bias": {"5": 101}}, "`logit_bias` values must be >= -100 and <= 100. Given: 101 for token 5"),
    ("chat", {"logit_bias": {"5": -100.5}}, "`logit_bias` values must be >= -100 and <= 100. Given: -100.5 for token 5"),
    ("chat", {"logit_bias": {"1000": 1}}, "`logit_bias` token ids must be >= 0 and < 1000. Given: 1000"),
    ("chat", {"logit_bias": {"-1": 1}}, "`logit_bias` token ids must be >= 0 and < 1000. Given: -1"),
    ("chat", {"logit_bias": {"a": 1}}, "`logit_bias` keys must be token ids. Given: 'a'"),
    ("chat", {"logit_bias": {"5": "x"}}, "`logit_bias` values must be numbers. Given: 'x' for token 5"),
    ("chat", {"top_logprobs": 6, "logprobs": True}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ("chat", {"max_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ("chat", {"max_completion_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ("chat", {"n": 3}, "`n` must be > 0 and <= 2. Given: 3"),
    ("chat", {"max_tokens": 1020}, "`inputs` tokens + `max_new_tokens` must be <= 1024. Given: {n} `inputs` tokens "
                                   "and 1020 `max_new_tokens`"),
    ("completions", {"temperature": -1.0}, "`temperature` must be strictly positive"),
    ("completions", {"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ("completions", {"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ("completions", {"frequency_penalty": -3.0}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("completions", {"presence_penalty": 2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ("completions", {"logprobs": 6, "echo": True}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ("completions", {"logit_bias": {"7": 200}}, "`logit_bias` values must be >= -100 and <= 100. Given: 200 for token 7"),
    ("completions", {"max_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ("completions", {"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ("completions", {"n": 0}, "`n` must be > 0 and <= 2. Given: 0"),
]


@pytest.mark.parametrize(("params", "message"), TGI_INVALID)
def test_tgi_invalid_values(server, params, message):
    r = httpx.post(server.base_url + "/generate", json={"inputs": "x", "parameters": params}, timeout=60)
    assert (r.status_code, r.json()) == (422, {"error": V + message, "error_type": "validation"})


def test_empty_inputs(server):
    r = httpx.post(server.base_url + "/generate", json={"inputs": "", "parameters": {"truncate": 0}}, timeout=60)
    assert r.json() == {"error": V + "`inputs` cannot be empty", "error_type": "validation"}


@pytest.mark.parametrize(("route", "body", "message"), OPENAI_INVALID)
def test_openai_invalid_values(server, tok, route, body, message):
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **body}
        message = message.replace("{n}", str(len(chat_ids(tok, "x"))))
    else:
        path, body = "/v1/completions", {"prompt": "x", **body}
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    assert (r.status_code, r.json()) == (422, {"error": V + message, "error_type": "validation"})
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True}, timeout=60) as s:
        if "n" in body:  # checked before the stream starts, like the prompt count
            assert s.status_code == 422
            return
        events = sse_events(s.read().decode().split("\n"))
    assert [json.loads(e) for e in events[:-1]] == [{"error": {"message": V + message, "http_status_code": 422}}]
    assert events[-1] == "[DONE]"
