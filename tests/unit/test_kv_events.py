"""KV-cache events: the exact events the block pool announces for each operation, and their
encoding on the wire as a vLLM-style subscriber decodes it from a real ZMQ SUB socket."""
from __future__ import annotations

import socket

import msgspec
import pytest
import zmq

from textgen.core.kv_cache import (AllBlocksCleared, BlockRemoved, BlockStored, KVCacheManager,
                                   hash_block_tokens)
from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import Request

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_new_tokens=8))


def chain(tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - BS + 1, BS):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else b"", tokens[start:start + BS]))
    return hashes


def compute(kv: KVCacheManager, request: Request, hits: list | None = None) -> None:
    num_hit = len(hits or []) * BS
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_tokens)


@pytest.fixture
def kv_events():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    events: list = []
    kv.add_event_observer(events.append)
    return kv, events


def test_publishing_announces_one_run_with_its_parent_and_tokens(kv_events):
    kv, events = kv_events
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    r = req("a", tokens)
    compute(kv, r)
    h = chain(tokens)
    assert events == [BlockStored((h[0], h[1]), None, tuple(tokens[:8]), BS)]
    r.append_output_token(7)
    r.append_output_token(8)  # 12 tokens: the third block fills
    kv.allocate_slots(r, 2)
    r.num_computed_tokens = 12
    kv.cache_blocks(r, 12)
    h = chain(r.all_token_ids)
    assert events[1:] == [BlockStored((h[2],), h[1], tuple(r.all_token_ids[8:12]), BS)]


def test_a_prefix_hit_is_not_announced_again(kv_events):
    kv, events = kv_events
    compute(kv, req("a", list(range(9))))
    events.clear()
    b = req("b", list(range(9)))
    hits, _ = kv.get_computed_blocks(b)
    compute(kv, b, hits)
    assert events == []


def test_eviction_announces_each_evicted_hash_in_free_list_order(kv_events):
    kv, events = kv_events
    a = req("a", list(range(8)))  # blocks 0, 1 published
    compute(kv, a)
    kv.free(a)  # free list: 2, 3, then 1, 0 (tail-first)
    events.clear()
    h = chain(list(range(8)))
    b = req("b", list(range(50, 62)))  # 3 blocks: 2, 3 and the evicted 1 (hash h[1])
    compute(kv, b)
    hb = chain(list(range(50, 62)))
    assert events == [BlockRemoved((h[1],)), BlockStored(tuple(hb), None, tuple(range(50, 62)), BS)]


def test_reset_announces_all_blocks_cleared(kv_events):
    kv, events = kv_events
    compute(kv, req("a", list(range(8))))
    events.clear()
    kv.reset_prefix_cache()
    assert events == [AllBlocksCleared()]


def test_no_observer_builds_no_event():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert not kv.pool.event_observers
    compute(kv, req("a", list(range(8))))
    assert len(kv.pool.cached) == 2


# -- wire format ------------------------------------------------------------------------------

class _Ev(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """A subscriber's own declaration of vLLM's structs (as vLLM's kv_events_subscriber example
    declares them, with lora_name as current vLLM has it), independent of textgen's encoder."""


class StoredV(_Ev, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class RemovedV(_Ev, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None


class ClearedV(_Ev, tag="AllBlocksCleared"):
    pass


class BatchV(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[StoredV | RemovedV | ClearedV]
    data_parallel_rank: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publisher_sends_vllm_frames_to_a_real_sub_socket():
    from textgen.api.kv_events import KVEventPublisher

    port = free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@pod@m")
    sub.bind(f"tcp://127.0.0.1:{port}")
    publisher = KVEventPublisher(f"tcp://127.0.0.1:{port}", topic="kv@pod@m")  # connects: no wildcard
    h0, h1 = hash_block_tokens(b"", [1, 2]), hash_block_tokens(hash_block_tokens(b"", [1, 2]), [3, 4])
    try:
        frames = []
        # a PUB that just connected drops what it sends before the subscription arrives: probe until one lands
        while not sub.poll(100):
            publisher.observe(AllBlocksCleared())
            publisher.flush()
        frames.append(sub.recv_multipart())
        publisher.observe(BlockStored((h0, h1), None, (1, 2, 3, 4), 2))
        publisher.observe(BlockRemoved((h0,)))
        publisher.flush()
        publisher.flush()  # an empty step sends nothing
        publisher.observe(AllBlocksCleared())
        publisher.flush()
        for _ in range(2):
            assert sub.poll(10_000)
            frames.append(sub.recv_multipart())
    finally:
        publisher.close()
        sub.close(0)
    while_probing = int.from_bytes(frames[0][1], "big")
    assert [f[0] for f in frames] == [b"kv@pod@m"] * 3
    assert [int.from_bytes(f[1], "big") for f in frames[1:]] == [while_probing + 1, while_probing + 2]
    assert all(len(f[1]) == 8 for f in frames)
    raw = msgspec.msgpack.decode(frames[1][2])
    assert raw[1:] == [[["BlockStored", [h0, h1], None, [1, 2, 3, 4], 2, None, "GPU", None],
                        ["BlockRemoved", [h0], "GPU"]], 0]
    assert isinstance(raw[0], float)
    batch = msgspec.msgpack.Decoder(type=BatchV).decode(frames[1][2])
    assert batch.events == [StoredV([h0, h1], None, [1, 2, 3, 4], 2, None, "GPU", None), RemovedV([h0], "GPU")]
    assert batch.data_parallel_rank == 0
    assert msgspec.msgpack.decode(frames[2][2])[1] == [["AllBlocksCleared"]]


def test_endpoint_reasons_name_the_fix():
    from textgen.api.kv_events import binds, endpoint_reasons

    assert endpoint_reasons(None) == [] and endpoint_reasons("tcp://*:5557") == []
    assert "must start with tcp://" in endpoint_reasons("localhost:5557")[0]
    assert binds("tcp://*:5557") and binds("ipc:///tmp/kv") and not binds("tcp://indexer:5557")


def test_launcher_refuses_a_bad_endpoint_before_loading_anything():
    import argparse

    from textgen.api.launcher import check_options
    from textgen.api.launcher_flags import add_flags, resolve

    parser = argparse.ArgumentParser()
    add_flags(parser)
    o = resolve(parser.parse_args([]), {"KV_EVENTS_ENDPOINT": "localhost:5557", "KV_EVENTS_TOPIC": "kv@pod@m"})
    assert o["kv_events_topic"] == "kv@pod@m"
    assert check_options(o) == ["--kv-events-endpoint must start with tcp://, ipc://, inproc:// (e.g. tcp://*:5557); "
                                "got 'localhost:5557'"]


@pytest.mark.slow
def test_serve_exits_2_when_the_endpoint_cannot_be_opened(tmp_path):
    import os
    import subprocess
    import sys

    endpoint = f"ipc://{tmp_path}/no-such-dir/kv"  # binding needs the directory
    done = subprocess.run([sys.executable, "-m", "textgen.api.cli", "serve", "--backend", "cpu", "--port", str(free_port()),
                           "--hostname", "127.0.0.1", "--kv-events-endpoint", endpoint], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"textgen serve: error: cannot open the KV events endpoint {endpoint}: ")
