"""The Redis store's key names: every key under :data:`PREFIX`; what each holds is in the
package docstring. Every key of one model carries the model as its hash tag (``iw:{<model>}:``,
:func:`model_key`), so that a Redis Cluster keeps a model's queue on one node and a script
touches one slot; the batch records are under the tag ``{batches}``. A line of a model and
task is four streams (kind ``s`` interactive, its front ``f``, ``b`` batch, its front ``c``):
``iw:{<model>}:<kind>:<task>``. The Lua scripts read the same layout (``lua/helpers.lua``:
``base_of``, ``front_of``; :data:`FRONT` and :data:`RELEASED` are passed to them)."""

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
#: The models with keys (a set): what the lease reaper, the counts and the pass over dead
#: models' streams walk, model by model (one slot at a time in a cluster).
MODELS = f"{PREFIX}models"
#: Batch records (a hash by batch id) and, under ``<BATCHES>:...``, their indexes.
BATCHES = f"{PREFIX}{{batches}}"
BATCH_CANCELS = f"{BATCHES}:cancels"
#: The batch records' hash and cancels of the layout before the hash tags (taken over once, at
#: start).
OLD_BATCHES = f"{PREFIX}batches"
OLD_BATCH_CANCELS = f"{PREFIX}batch-cancels"
#: An item id: ``<entry id>/<input>@<stream key>`` of a line.
ITEM_ID = re.compile(
    rf"\d+-\d+/\d+@{re.escape(PREFIX)}\{{[^\n]+\}}:[{''.join(FRONT)}]:"
    rf"(?:{'|'.join(get_args(Task))})\Z"
)


def model_key(model: str) -> str:
    """The prefix of every key of ``model``: ``iw:{<model>}``, its name the hash tag (``%``
    and ``}`` escaped as ``%25`` and ``%7D``: a ``}`` would end the tag early, an empty one
    if first)."""
    return f"{PREFIX}{{{model.replace('%', '%25').replace('}', '%7D')}}}"


def stream_key(model: str, task: str, priority: int | None = None) -> str:
    """The line of a model and task: ``iw:{<model>}:s:<task>`` interactive, ``...:b:...``
    batch."""
    kind = "b" if priority == BATCH_PRIORITY else "s"
    return f"{model_key(model)}:{kind}:{task}"


def _parts(key: str) -> tuple[str, str, str]:
    """A stream key's model key, kind and task (neither kind nor task holds a colon)."""
    base, kind, task = key.rsplit(":", 2)
    return base, kind, task


def front(key: str) -> str:
    """The front stream of a line: inputs put back before it (split off a pulled entry,
    released, or to be retried)."""
    base, kind, task = _parts(key)
    return f"{base}:{FRONT[kind]}:{task}"


def batch_line(key: str) -> str:
    """The batch line beside an interactive line."""
    base, _, task = _parts(key)
    return f"{base}:b:{task}"


def is_batch(key: str) -> bool:
    return _parts(key)[1] in "bc"


def model_of(key: str) -> str:
    """The model of a stream key."""
    return _parts(key)[0][len(PREFIX) + 1 : -1].replace("%7D", "}").replace("%25", "%")


def model_of_item(item_id: str) -> str:
    """The model of an item id (``<entry>/<input>@<stream key>``)."""
    return model_of(item_id.partition("@")[2])


def streams(model: str) -> str:
    """Every stream key of a model (a set); a stream with no entries whose model no worker
    advertises any longer is deleted."""
    return f"{model_key(model)}:streams"


def active(model: str) -> str:
    """The model's streams with entries (a set)."""
    return f"{model_key(model)}:active"


def unanswered(model: str, batch: bool = False) -> str:
    """The model's unanswered interactive (``:n``) or batch (``:nb``) inputs (an integer)."""
    return f"{model_key(model)}:{'nb' if batch else 'n'}"


def replica(model: str, name: str) -> str:
    """A replica's heartbeat beside a model's queue: set while it has that model's clients."""
    return f"{model_key(model)}:replica:{name}"


def reply(model: str, name: str) -> str:
    """A replica's reply stream for its clients of a model."""
    return f"{model_key(model)}:reply:{name}"


def advert(model: str) -> str:
    """A model's latest advert."""
    return f"{model_key(model)}:advert"


def worker(worker_id: str) -> str:
    """A worker's adverts."""
    return f"{PREFIX}worker:{worker_id}"


def batch_runner(batch_id: str) -> str:
    """The claim of the replica running a batch."""
    return f"{BATCHES}:runner:{batch_id}"
