"""The Redis store's parts that need no Redis (fast layer): key names (:mod:`keys`), the
stamped dict of early answers (:mod:`stamped`) and the client side's futures
(:mod:`replies`): an answer that arrives before its request's futures is kept for them, one
for a client that went away is dropped; and the background passes' walk over the models.
The store on a real redis-server: ``tests/e2e/test_queue_store_redis.py``."""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from common.protocol import ItemResult
from gateway.queue.redis import keys
from gateway.queue.redis.connection import Connection, without_password
from gateway.queue.redis.replies import Replies
from gateway.queue.redis.stamped import Stamped
from gateway.queue.store import StoreUnavailable

MODEL = "org:model@v2"  # a name with the separators the keys use


def test_stream_keys_name_their_line_model_and_kind():
    interactive = keys.stream_key(MODEL, "embed")
    batch = keys.stream_key(MODEL, "embed", priority=1)
    assert (interactive, batch) == (f"iw:{{{MODEL}}}:s:embed", f"iw:{{{MODEL}}}:b:embed")
    assert keys.front(interactive) == f"iw:{{{MODEL}}}:f:embed"
    assert keys.front(batch) == f"iw:{{{MODEL}}}:c:embed"
    assert keys.batch_line(interactive) == batch
    assert [keys.is_batch(k) for k in (interactive, keys.front(interactive), batch)] == [
        False,
        False,
        True,
    ]
    assert keys.is_batch(keys.front(batch))
    assert keys.model_of(interactive) == MODEL and keys.model_of(keys.front(batch)) == MODEL
    item = f"1712-0/3@{interactive}"
    assert keys.ITEM_ID.match(item) and keys.model_of_item(item) == MODEL
    assert not keys.ITEM_ID.match("1-0/1@iw:s:embed:m")  # the layout before the hash tags


@pytest.mark.parametrize(
    "model", [MODEL, "m", "a{b", "a}b", "{x}", "}x", "}", "%7D", "a%}b", "LoRA:adapter/1"]
)
def test_every_key_of_a_model_is_in_one_cluster_slot(model):
    """A Redis Cluster runs a script on the node of its keys' slot: every key a script of
    one model touches (streams, fronts, done hashes, counts, sets, heartbeats, reply
    streams, advert) hashes to one slot, whatever the model's name holds."""
    lines = [keys.stream_key(model, t, p) for t in ("embed", "score") for p in (None, 1)]
    streams = lines + [keys.front(k) for k in lines]
    named = [keys.model_key(model), keys.streams(model), keys.active(model), keys.advert(model)]
    named += [keys.unanswered(model), keys.unanswered(model, batch=True)]
    named += [keys.replica(model, "r1"), keys.reply(model, "r1")]
    done = [f"iw:d:1-0@{k}" for k in streams]  # lua/helpers.lua: done_key
    assert {key_slot(k.encode()) for k in streams + named + done} == {
        key_slot(keys.model_key(model).encode())
    }
    assert all(keys.model_of(k) == model for k in streams)
    assert all(keys.model_of_item(f"1-0/1@{k}") == model for k in streams)
    assert all(keys.ITEM_ID.match(f"1-0/1@{k}") for k in streams)


def test_the_batch_keys_share_one_slot():
    from gateway.queue.redis import batches

    names = [keys.BATCHES, keys.BATCH_CANCELS, keys.batch_runner("b1"), batches.RUNNING]
    names += [batches.BY_OWNER + "o", f"{batches.RUNNING}:o", batches.ENDED, batches.OWNERS]
    names += [batches.INDEXED]
    assert len({key_slot(k.encode()) for k in names}) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stamped_forgets_the_entries_older_than_asked_oldest_first(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("gateway.queue.redis.stamped.time.monotonic", clock)
    s: Stamped[str] = Stamped()
    s.keep("a", "1")
    clock.now = 105.0
    s.keep("b", "2")
    clock.now = 110.0
    s.keep("a", "3")  # kept again: stamped now, last in order
    assert s.get("a") == (110.0, "3") and len(s) == 2
    clock.now = 116.0
    s.forget_older(10.0)  # cutoff 106: "b" (105) goes, "a" (110) stays
    assert s.get("b") is None and s.get("a") == (110.0, "3")
    s.forget_older(6.0)  # cutoff 110: not older than it, stays
    assert len(s) == 1
    assert s.pop("a") == (110.0, "3") and s.pop("a") is None and len(s) == 0


def result(n: int) -> ItemResult:
    return ItemResult(item_id=f"i{n}", lease_id="l", prompt_tokens=n)


async def test_an_answer_is_given_to_its_waiting_client_or_kept_for_it():
    r = Replies(conn=None, replica="r1")  # type: ignore[arg-type]  # no Redis call here
    assert r.key(MODEL) == keys.reply(MODEL, "r1")
    (waiting,) = r.expect(["c:0"])
    assert r.holds("c:0") and not waiting.done()
    r.resolve("c:0", result(1))
    assert waiting.result() == result(1) and not r.holds("c:0")
    r.resolve("c:1", result(2))  # before its request registered: kept
    assert not r.holds("c:1")
    early, late = r.expect(["c:1", "c:2"])
    assert early.result() == result(2) and not late.done() and r.holds("c:2")
    again = r.expect(["c:1"])[0]
    assert not again.done()  # an early answer is given once


async def test_answer_says_whether_a_client_waits_and_drop_forgets_it():
    r = Replies(conn=None, replica="r1")  # type: ignore[arg-type]
    assert r.answer("nobody", result(1)) is False
    (f,) = r.expect(["c:0"])
    r.drop("c:0")
    assert not r.holds("c:0") and r.answer("c:0", result(1)) is False and not f.done()
    (g,) = r.expect(["c:1"])
    g.cancel()  # its client went away: the answer is taken, the future left as it is
    assert r.answer("c:1", result(1)) is True and g.cancelled()
    await asyncio.sleep(0)


def test_a_password_given_apart_takes_the_urls_place_the_user_name_stays():
    """redis-py lets a URL's password win over its ``password`` argument: it is taken out."""
    assert without_password("redis://:old@h:6379/2") == "redis://h:6379/2"
    assert without_password("rediss://ann:old@h:6380/0") == "rediss://ann@h:6380/0"
    assert without_password("redis://ann@h/0") == "redis://ann@h/0"
    assert without_password("redis://h:6379") == "redis://h:6379"
    assert without_password("redis://:p@ss@h:1/0") == "redis://h:1/0"  # an @ in the password


async def test_a_model_on_an_unreachable_node_does_not_end_the_walk_of_the_others():
    """The reap and dead-model passes (:meth:`Connection.each_model`): a StoreUnavailable of
    one model (a cluster node down) is raised after every model had its step; any other error
    ends the walk at once. No Redis call is made: the client connects on first use."""
    conn = Connection("redis+cluster://127.0.0.1:1")
    walked: list[str] = []

    async def step(model: str) -> None:
        walked.append(model)
        if model in ("b", "d"):
            raise StoreUnavailable(f"Redis: node of {model} down")

    with pytest.raises(StoreUnavailable, match="node of b down"):
        await conn.each_model(["a", "b", "c", "d", "e"], step)
    assert walked == ["a", "b", "c", "d", "e"]

    walked.clear()
    await conn.each_model(["a", "c"], step)
    assert walked == ["a", "c"]

    async def broken(model: str) -> None:
        walked.append(model)
        raise ValueError(model)

    walked.clear()
    with pytest.raises(ValueError):
        await conn.each_model(["a", "b"], broken)
    assert walked == ["a"]
