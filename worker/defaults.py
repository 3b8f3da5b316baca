"""The worker's timing policy, named in one place (in the manner of rq's ``defaults.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: wait ``initial`` seconds after the first failure, twice as long
    after each further one, never more than ``maximum``; back to ``initial`` after a success."""

    initial: float
    maximum: float

    def after(self, wait: float) -> float:
        """The wait after one more failure, given the last wait."""
        return min(wait * 2, self.maximum)


#: A pull that failed after its HTTP retries (queue_client): wait, then pull again, forever.
PULL_BACKOFF = Backoff(initial=0.5, maximum=5.0)
#: A post of results that failed after its HTTP retries: wait, then post again while the
#: items' leases last (after that the queue has redelivered them anyway).
POST_BACKOFF = Backoff(initial=0.5, maximum=10.0)
#: Seconds between two looks at the engine (alive? vLLM's own metrics updated).
ENGINE_WATCH_SECONDS = 1.0
#: Items in flight when ``queue.max_items_in_flight`` is unset: this many x ``max_num_seqs``,
#: so the engine always has a queue of its own.
ITEMS_IN_FLIGHT_PER_SEQ = 2
#: Estimated prompt tokens in flight when ``queue.max_tokens_in_flight`` is unset: this many x
#: the engine's ``max_num_batched_tokens`` (a few engine steps of work).
TOKENS_IN_FLIGHT_PER_STEP = 4
#: A worker with items in flight pulls again once this many engine steps' worth of estimated
#: tokens (``max_num_batched_tokens`` each; at most half of ``max_tokens_in_flight``) are
#: free: the engine still has work queued, and a pull brings a step's worth of long inputs at
#: once (rather than one long document per pull, each pull and post a round trip).
MIN_PULL_STEPS = 1
#: Batch-job items a worker holds (leased) while interactive items flow; it pulls more only
#: as they finish, so that its capacity stays free for interactive items.
BATCH_ITEMS_HELD_WHILE_BUSY = 32
#: A pulled batch of at most this many estimated prompt tokens is tokenized on the event loop
#: (cheaper than a thread hop); a larger one in a worker thread, so that a long text never
#: blocks the loop.
PREPARE_INLINE_TOKENS = 256
