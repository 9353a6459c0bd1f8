"""Replicas: the pure routing policy (`engines/routing.py`), the `ReplicaSet` around it with fake
replica engines (failover, retries elsewhere, the merged load), and the config that names them."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from backfill.engines.base import EngineReply
from backfill.engines.registry import build_engine
from backfill.engines.replicas import ReplicaSet, merge_loads
from backfill.engines.routing import Router
from backfill.errors import EngineUnavailable, InvalidRequest
from backfill.settings import ModelConfig, build_settings, parse_model_spec

# -- the policy ---------------------------------------------------------------------------------


def test_least_loaded_picks_the_replica_with_the_fewest_requests() -> None:
    router = Router(3, "least_loaded")
    for _ in range(5):
        router.started(0)
    router.started(1)
    assert router.pick() == 2
    router.started(2)
    router.started(2)
    assert router.pick() == 1


def test_least_loaded_counts_the_upstreams_own_queue() -> None:
    router = Router(2, "least_loaded")
    router.started(0)
    router.observe(1, 10.0)  # busy with other clients' requests
    assert router.pick() == 0
    router.observe(1, 0.0)
    assert router.pick() == 1


def test_an_idle_set_is_filled_evenly() -> None:
    router = Router(4, "least_loaded")
    chosen = []
    for _ in range(8):
        i = router.pick()
        router.started(i)
        chosen.append(i)
    assert Counter(chosen) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_round_robin_takes_turns_whatever_the_load() -> None:
    router = Router(3, "round_robin")
    for _ in range(10):
        router.started(0)
    assert [router.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_affinity_keeps_a_group_on_its_replica() -> None:
    router = Router(4, "affinity")
    home = router.pick(key=42)
    router.started(home)
    for _ in range(5):  # busier than the others, but not much busier
        assert router.pick(key=42) == home
        router.started(home)
    assert router.pick(key=100) != home  # a new group goes least-loaded


def test_affinity_spills_from_a_much_busier_replica_and_keeps_the_group() -> None:
    router = Router(2, "affinity", spill_ratio=0.5, spill_margin=2)
    home = router.pick(key=7)
    other = 1 - home
    for _ in range(3):
        router.started(home)
    assert router.pick(key=7) == other  # 3 > 0 * 1.5 + 2: spills
    assert router.group_of(7) == home  # the group stays where its cache is
    router.finished(home)
    assert router.pick(key=7) == home  # 2 <= 2: back home


def test_requests_without_a_group_go_least_loaded() -> None:
    router = Router(2, "affinity")
    router.started(0)
    assert router.pick(key=None) == 1


def test_the_group_map_is_bounded() -> None:
    router = Router(2, "affinity", max_groups=3)
    for key in range(10):
        router.pick(key=key)
    assert [router.group_of(k) is not None for k in range(10)] == [False] * 7 + [True] * 3


def test_a_transport_failure_drains_at_once_and_a_probe_brings_it_back() -> None:
    router = Router(3, "affinity", probe_interval=1.0)
    home = router.pick(key=5)
    assert router.failed(home, answered=False, now=100.0)
    assert all(router.pick(key=5) != home for _ in range(20))
    assert router.pick(key=5) == router.group_of(5)  # the group moved with its new replica
    assert not router.probe_due(home, 100.5)
    assert router.probe_due(home, 101.0)
    router.recovered(home)
    assert not router.states[home].drained
    assert home in router.candidates()


def test_answers_over_500_drain_only_when_repeated() -> None:
    router = Router(2, "least_loaded", drain_after=3)
    assert not router.failed(0, answered=True, now=0.0)
    assert not router.failed(0, answered=True, now=0.0)
    router.succeeded(0)  # a success in between starts the count again
    assert not router.failed(0, answered=True, now=0.0)
    assert not router.failed(0, answered=True, now=0.0)
    assert router.failed(0, answered=True, now=0.0)
    assert router.candidates() == [1]


def test_probes_back_off_while_a_replica_keeps_failing() -> None:
    router = Router(2, probe_interval=1.0, max_probe_interval=4.0)
    for drain, wait in enumerate([1.0, 2.0, 4.0, 4.0], start=1):
        router.failed(0, answered=False, now=0.0)
        assert router.states[0].drains == drain
        assert not router.probe_due(0, wait - 0.01)
        assert router.probe_due(0, wait)
        router.recovered(0)  # back, and failing again at once
    router.succeeded(0)
    router.failed(0, answered=False, now=0.0)
    assert router.probe_due(0, 1.0)


def test_a_retry_avoids_the_replica_it_failed_on() -> None:
    router = Router(2, "affinity")
    home = router.pick(key=9)
    assert router.pick(key=9, avoid=home) != home
    assert router.group_of(9) == home  # one request's retry does not move the group
    assert Router(1).pick(avoid=0) == 0  # unless no other replica exists


def test_with_every_replica_drained_requests_still_go_somewhere() -> None:
    router = Router(2)
    router.failed(0, answered=False, now=0.0)
    router.failed(1, answered=False, now=0.0)
    assert router.pick(key=1) in (0, 1)


# -- the replica set with fake replicas ---------------------------------------------------------


class FakeReplica:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []
        self.fail: str | None = None  # "refused" | "timeout" | "500"
        self.up = True
        self.figures: dict[str, float] | None = None

    async def send(self, endpoint: str, body: dict[str, Any], *, timeout: float | None = None):
        self.sent.append(body)
        if self.fail == "refused":
            raise EngineUnavailable("unreachable", code="upstream_unavailable")
        if self.fail == "timeout":
            raise EngineUnavailable("no answer", code="request_timeout")
        if self.fail == "500":
            return EngineReply(500, b"{}")
        return EngineReply(200, self.name.encode())

    async def probe(self) -> bool:
        return self.up

    async def load_metrics(self) -> dict[str, float] | None:
        return self.figures

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def replica_set(n: int, routing: str = "affinity") -> tuple[ReplicaSet, list[FakeReplica]]:
    urls = [f"http://r{i}:8000/v1" for i in range(n)]
    rs = ReplicaSet(ModelConfig(name="m", urls=urls, routing=routing))  # type: ignore[arg-type]
    fakes = [FakeReplica(f"r{i}") for i in range(n)]
    rs.replicas = fakes  # type: ignore[assignment]
    return rs, fakes


def chat(prefix: str, question: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": prefix}, {"role": "user", "content": question}]
    }


def test_requests_sharing_a_prefix_go_to_one_replica() -> None:
    rs, fakes = replica_set(3)

    async def main() -> None:
        for q in range(30):
            for p in range(6):
                await rs.send("/v1/chat/completions", chat(f"doc {p} " * 200, f"q{q}"))

    asyncio.run(main())
    homes: dict[str, set[str]] = {}
    for fake in fakes:
        for body in fake.sent:
            homes.setdefault(body["messages"][0]["content"][:6], set()).add(fake.name)
    assert len(homes) == 6
    assert all(len(names) == 1 for names in homes.values())
    assert all(fake.sent for fake in fakes)  # and the groups are spread


def test_a_refused_connection_is_re_sent_at_once_to_another_replica() -> None:
    rs, fakes = replica_set(3)
    body = chat("x" * 1000, "q")
    reply = asyncio.run(rs.send("/v1/chat/completions", body))
    home = next(f for f in fakes if f.sent)
    assert reply.body == home.name.encode()
    home.fail = "refused"
    reply = asyncio.run(rs.send("/v1/chat/completions", body))
    assert reply.status == 200 and reply.body != home.name.encode()
    assert len(home.sent) == 2  # tried once, then drained
    asyncio.run(rs.send("/v1/chat/completions", body))
    assert len(home.sent) == 2  # no new requests while drained
    assert rs.replica_stats()[fakes.index(home)]["drained"]


def test_every_replica_refusing_raises_for_the_dispatcher() -> None:
    rs, fakes = replica_set(2)
    for fake in fakes:
        fake.fail = "refused"
    with pytest.raises(EngineUnavailable):
        asyncio.run(rs.send("/v1/chat/completions", chat("a", "b")))
    assert [len(f.sent) for f in fakes] == [1, 1]


def test_the_retry_of_a_timeout_or_a_500_goes_to_another_replica() -> None:
    for failure in ("timeout", "500"):
        rs, fakes = replica_set(2)
        body = chat("y" * 1000, "q")
        asyncio.run(rs.send("/v1/chat/completions", body))
        home = next(f for f in fakes if f.sent)
        home.fail = failure
        if failure == "timeout":
            with pytest.raises(EngineUnavailable):
                asyncio.run(rs.send("/v1/chat/completions", body))
        else:
            assert asyncio.run(rs.send("/v1/chat/completions", body)).status == 500
        reply = asyncio.run(rs.send("/v1/chat/completions", body))  # the dispatcher's retry
        assert reply.status == 200 and reply.body != home.name.encode(), failure


def test_a_drained_replica_is_probed_back() -> None:
    rs, fakes = replica_set(2)
    rs.router.probe_interval = 0.05

    async def main() -> None:
        await rs.start()
        try:
            fakes[0].fail = "refused"
            fakes[0].up = False
            await rs.send("/v1/chat/completions", chat("p" * 600, "q"))
            await rs.send("/v1/chat/completions", chat("z" * 600, "q"))
            assert rs.router.states[0].drained
            fakes[0].fail = None
            fakes[0].up = True
            deadline = asyncio.get_running_loop().time() + 5
            while rs.router.states[0].drained:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        finally:
            await rs.close()

    asyncio.run(main())


def test_the_governor_sees_the_summed_load() -> None:
    rs, fakes = replica_set(3)
    fakes[0].figures = {
        "vllm:num_requests_running": 4.0,
        "vllm:num_requests_waiting": 1.0,
        "vllm:kv_cache_usage_perc": 0.2,
        "vllm:inter_token_latency_seconds_sum": 10.0,
        "vllm:inter_token_latency_seconds_count": 100.0,
    }
    fakes[1].figures = {
        "vllm:num_requests_running": 6.0,
        "vllm:num_requests_waiting": 0.0,
        "vllm:kv_cache_usage_perc": 0.6,
        "vllm:inter_token_latency_seconds_sum": 5.0,
        "vllm:inter_token_latency_seconds_count": 50.0,
    }
    load = asyncio.run(rs.load_metrics())
    assert load == {
        "vllm:num_requests_running": 10.0,
        "vllm:num_requests_waiting": 1.0,
        "vllm:kv_cache_usage_perc": pytest.approx(0.4),
        "vllm:inter_token_latency_seconds_sum": 15.0,
        "vllm:inter_token_latency_seconds_count": 150.0,
    }
    assert [s.external for s in rs.router.states] == [5.0, 6.0, 0.0]
    fakes[1].figures = None  # one missed scrape: its counters are held, its gauges are not
    load = asyncio.run(rs.load_metrics())
    assert load is not None
    assert load["vllm:num_requests_running"] == 4.0
    assert load["vllm:inter_token_latency_seconds_count"] == 150.0
    assert merge_loads([None], [None]) is None


# -- configuration ------------------------------------------------------------------------------


def test_model_specs_with_several_urls_are_replicas() -> None:
    m = parse_model_spec("llama=http://a:8000/v1, http://b:8000/v1#meta/llama")
    assert m.urls == ["http://a:8000/v1", "http://b:8000/v1"]
    assert m.url == "http://a:8000/v1" and m.upstream_name == "meta/llama"
    assert isinstance(build_engine(m), ReplicaSet)
    one = parse_model_spec("llama=http://a:8000/v1")
    assert one.urls == [] and one.upstream_urls == ["http://a:8000/v1"]
    assert not isinstance(build_engine(one), ReplicaSet)
    with pytest.raises(InvalidRequest):
        parse_model_spec("llama=http://a:8000/v1,")


def test_toml_urls_and_routing(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[models.llama]\nurls = ["http://a/v1", "http://b/v1"]\nrouting = "round_robin"\n'
    )
    (model,) = build_settings(path).models
    assert model.upstream_urls == ["http://a/v1", "http://b/v1"]
    assert model.routing == "round_robin"
    bad = [
        {"urls": ["http://a/v1", "http://a/v1"]},
        {"url": "http://c/v1", "urls": ["http://a/v1"]},
        {"urls": ["http://a/v1"], "routing": "random"},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            ModelConfig(name="m", **fields)
