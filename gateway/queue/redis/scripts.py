"""The store's Lua scripts (``lua/*.lua``), read once per process and registered on a client.

Where two writes must happen together the work is a script (atomic in Redis). Every script
that takes the key prefix and the group as its first two arguments is run after
``lua/helpers.lua`` and a prelude of the constants Python defines (:data:`~.keys.RELEASED`,
:data:`~.keys.FRONT`, :data:`~gateway.queue.store.DEAD_LETTER`): written once, in one
language. A script touches the keys of one model alone, which share its hash tag
(:mod:`.keys`), and declares a key of that model (the first key, or the model's key prefix):
a Redis Cluster runs it on the node of that slot; it derives the other key names of the model
from its arguments."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from gateway.queue.redis.keys import FRONT, RELEASED, model_key
from gateway.queue.store import DEAD_LETTER

LUA = Path(__file__).with_name("lua")
#: Scripts that stand alone (their arguments are not the prefix and the group).
STANDALONE = ("claim", "save_batch")


@functools.cache
def source(name: str) -> str:
    """The text run for script ``name``: the prelude and the helpers, then the script."""
    script = (LUA / f"{name}.lua").read_text()
    if name in STANDALONE:
        return script
    front = ", ".join(f"{k} = {json.dumps(v)}" for k, v in FRONT.items())
    prelude = (
        f"local RELEASED = {json.dumps(RELEASED)}\n"
        f"local FRONT = {{{front}}}\n"
        f"local DEAD_LETTER = {json.dumps(DEAD_LETTER)}\n"
    )
    return prelude + (LUA / "helpers.lua").read_text() + script


class Script:
    """One script on ``client`` (a Redis or a RedisCluster client): ``EVALSHA``, and where
    the node that runs it does not have it (a restart, or its first call there), ``EVAL``,
    which caches it on that node alone. Not redis-py's ``register_script``: that loads a
    missing script on every primary of a cluster, so one node down would fail the scripts
    of every other node."""

    def __init__(self, client: Any, text: str):
        self.client, self.text = client, text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.text, len(keys), *keys, *args)

    async def of_model(self, model: str, args: Sequence[Any]) -> Any:
        """Run on ``model``'s keys: the script declares the model's key prefix
        (:func:`~.keys.model_key`; its node in a cluster) and derives the rest."""
        return await self(keys=[model_key(model)], args=args)


class Scripts:
    """The scripts (each a :class:`Script`) on ``client``."""

    def __init__(self, client: Any):
        def load(name: str) -> Script:
            return Script(client, source(name))

        self.submit = load("submit")
        self.pull = load("pull")
        self.complete = load("complete")
        self.release = load("release")
        self.unread = load("unread")
        self.reap = load("reap")
        self.counts = load("counts")
        self.forget = load("forget")
        self.cancel = load("cancel")
        self.claim = load("claim")
        self.save_batch = load("save_batch")
