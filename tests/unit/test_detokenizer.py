"""Incremental detokenization and stop-sequence matching, on a real byte-level BPE tokenizer."""
from __future__ import annotations

import pytest

from textgen.core.engine.detokenizer import IncrementalDetokenizer, StopMatcher, raw_decoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from textgen.testing.tiny_models import make_tokenizer

    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("text", [
    "def héllo_world(x):\n    return x ** 2  # ünïcödé ✓ 日本語\n",
    "    indented\tand tabs  ",
    "emoji 🐍🐍 and more",
])
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("some prompt")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer.for_prompt(tokenizer, prompt)
    deltas = [detok.add(i)[1] for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_raw_decoder_is_the_tokenizers_decode(tokenizer):
    """The direct Rust decode gives what transformers' decode gives (specials kept, no clean-up),
    and a tokenizer class that overrides decoding keeps its own decode."""
    ids = tokenizer.encode("def héllo(x):\n    return x  ,  . 🐍", add_special_tokens=False)
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    decode = raw_decoder(tokenizer)
    assert decode.__code__ is not raw_decoder(object()).__code__  # the fast path was taken
    for end in range(1, len(ids) + 1):
        for start in range(0, end, 3):
            want = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert decode(ids[start:end]) == want

    class Shouting(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    tokenizer.__class__ = Shouting
    try:
        assert raw_decoder(tokenizer)(ids[1:4]) == tokenizer.decode(ids[1:4], skip_special_tokens=False).upper() != ""
    finally:
        tokenizer.__class__ = Shouting.__mro__[1]


def test_special_tokens_are_reported_but_not_in_the_text(tokenizer):
    detok = IncrementalDetokenizer.for_prompt(tokenizer, tokenizer.encode("x"))
    ids = tokenizer.encode("ab", add_special_tokens=False)
    out = [detok.add(i) for i in ids] + [detok.add(tokenizer.eos_token_id)]
    assert out[-1] == ("</s>", "")
    assert "".join(d for _, d in out) == "ab"


def test_long_generation_keeps_a_short_window(tokenizer):
    detok = IncrementalDetokenizer.for_prompt(tokenizer, tokenizer.encode("x"))
    text = "for i in range(10):\n    print(i)\n" * 40
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(detok.add(i)[1] for i in ids) == text
    assert len(detok.token_ids) < 80


def test_stop_sequence_across_pieces_cuts_after_the_stop():
    m = StopMatcher(["return x", "zz"])
    emitted, stop = [], None
    for piece in ["def f(", "x): ret", "urn x * 2", "more"]:
        out, stop = m.feed(piece)
        emitted.append(out)
        if stop:
            break
    assert stop == "return x"
    assert "".join(emitted) == "def f(x): return x"
    assert emitted[-1] == "urn x"


def test_earliest_ending_stop_wins_and_no_stop_passes_through():
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xabcde") == ("xabc", "bc")
    assert StopMatcher([]).feed("anything") == ("anything", None)
    assert StopMatcher(["q"]).feed("abc") == ("abc", None)
