"""The Redis store's key names: every key under :data:`PREFIX`; what each holds is in the
package docstring. A line of a model and task is four streams (kind ``s`` interactive, its
front ``f``, ``b`` batch, its front ``c``): ``iw:<kind>:<task>:<model>``. The Lua scripts
read the same layout (``lua/helpers.lua``: ``model_of``, ``front_of``; :data:`FRONT` and
:data:`RELEASED` are passed to them)."""

from __future__ import annotations

import re
from typing import get_args

from common.protocol import BATCH_PRIORITY, Task

PREFIX = "iw:"
#: The consumer group of every stream; a worker is a consumer.
GROUP = "workers"
#: The placeholder consumer that holds entries put back: a pull takes them first.
RELEASED = "~released"
#: Stream kind -> the kind of its front stream.
FRONT = {"s": "f", "f": "f", "b": "c", "c": "c"}
#: The random key lease ids are signed with (one per Redis, made by the first replica).
LEASE_KEY = f"{PREFIX}lease-key"
#: Every stream key; the streams with entries.
STREAMS = f"{PREFIX}streams"
ACTIVE = f"{PREFIX}active"
#: Batch records (a hash by batch id) and, under ``<BATCHES>:...``, their indexes.
BATCHES = f"{PREFIX}batches"
BATCH_CANCELS = f"{PREFIX}batch-cancels"
#: An item id: ``<entry id>/<input>@<stream key>`` of a line.
ITEM_ID = re.compile(
    rf"\d+-\d+/\d+@{re.escape(PREFIX)}[{''.join(FRONT)}]:(?:{'|'.join(get_args(Task))}):[^\n]+\Z"
)


def stream_key(model: str, task: str, priority: int | None = None) -> str:
    """The line of a model and task: ``iw:s:...`` interactive, ``iw:b:...`` batch."""
    kind = "b" if priority == BATCH_PRIORITY else "s"
    return f"{PREFIX}{kind}:{task}:{model}"


def front(key: str) -> str:
    """The front stream of a line: inputs put back before it (split off a pulled entry,
    released, or to be retried)."""
    kind = key[len(PREFIX)]
    return f"{PREFIX}{FRONT[kind]}{key[len(PREFIX) + 1 :]}"


def batch_line(key: str) -> str:
    """The batch line beside an interactive line."""
    return f"{PREFIX}b{key[len(PREFIX) + 1 :]}"


def is_batch(key: str) -> bool:
    return key[len(PREFIX)] in "bc"


def model_of(key: str) -> str:
    """The model of a stream key."""
    return key.split(":", 3)[3]


def model_of_item(item_id: str) -> str:
    """The model of an item id (``<entry>/<input>@<stream key>``)."""
    return model_of(item_id.partition("@")[2])


def replica(name: str) -> str:
    """A replica's heartbeat key."""
    return f"{PREFIX}replica:{name}"


def reply(name: str) -> str:
    """A replica's reply stream."""
    return f"{PREFIX}reply:{name}"


def worker(worker_id: str) -> str:
    """A worker's adverts."""
    return f"{PREFIX}worker:{worker_id}"


def advert(model: str) -> str:
    """A model's latest advert."""
    return f"{PREFIX}advert:{model}"


def batch_runner(batch_id: str) -> str:
    """The claim of the replica running a batch."""
    return f"{PREFIX}batch-runner:{batch_id}"
