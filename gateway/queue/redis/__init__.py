"""The Redis queue store: one queue shared by stateless gateway replicas (Redis >= 7 or Valkey),
through the official ``redis`` package's asyncio client. :class:`RedisStore`
(:mod:`.store`) is a thin facade over its parts:

- :mod:`.keys` — key names; :mod:`.entries` — the entry codec; :mod:`.scripts` and ``lua/`` —
  the Lua scripts (two writes that must happen together are one script);
- :mod:`.connection` — the clients and every call; :mod:`.leases` — signed lease ids;
- :mod:`.submit` — the client side: SUBMIT (coalesced per line), cancel;
  :mod:`.replies` — the client side's answers (reply stream, futures, early results);
- :mod:`.workers` — the worker side: pull, results, release, lease reaping;
  :mod:`.registry` — what a worker's pull registers, and the models walked one by one;
- :mod:`.batches` — batch records and their indexes.

Data model (every key under ``iw:``; every key of one model under its hash tag
``iw:{<model>}:`` (:mod:`.keys`), so that a Redis Cluster keeps a model's queue on one node;
``docs/queue-protocol.md`` has the table):

- ``iw:{<model>}:s:<task>`` — a Stream per (model, task), the line: one entry per chunk of a
  request (:mod:`.entries`): the replica that holds the client's connection, the request id,
  and its inputs' specs, indices in the request and estimated tokens as three lists.
  Consumer group ``workers``; a worker is a consumer. An input's item id is
  ``<entry id>/<input>@<stream>``. ``...:b:<task>`` the same for batch jobs' inputs.
- ``...:f:<task>`` / ``...:c:<task>`` — the front of each line, read first: inputs split off
  an entry that a pull could not take whole, released or retried, as entries of their own that
  keep their attempt count.
- Leases are the groups' pending-entries lists (:mod:`.workers`).
- ``iw:d:<entry>@<stream>`` — the inputs that left an entry, answered or moved; the entry is
  ``XACK`` + ``XDEL``-ed with its last one. ``iw:{<model>}:n`` / ``:nb`` — the model's
  unanswered interactive / batch inputs.
- ``iw:{<model>}:reply:<replica>`` — a Stream per gateway replica and model: results for the
  clients it holds. ``iw:{<model>}:replica:<replica>`` — the replica's heartbeat beside the
  model; inputs of a replica that is gone are dropped instead of processed for nobody.
- ``iw:worker:<worker_id>`` — a worker's adverts (TTL the worker TTL); ``iw:{<model>}:advert``
  the latest advert of a model (TTL the advert TTL); ``iw:{<model>}:streams`` the model's
  stream keys, ``...:active`` those with entries; ``iw:models`` the models with keys;
  ``iw:lease-key``; ``iw:{batches}...`` (:mod:`.batches`).
"""

from gateway.queue.redis.store import RedisStore

__all__ = ["RedisStore"]
