"""The queue: the store interface and what both stores share (:mod:`.store`), the in-memory
store (:mod:`.memory`), the Redis store (:mod:`.redis`), and the worker routes of queue
protocol v1 (:mod:`.routes`)."""
