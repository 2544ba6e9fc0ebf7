"""Events in, state out: event schemas, topics, the producer SDK, and the state the events build in Redis
(with its counters and percentile tables). Above ``core`` only; the worker process that runs it is ``onetower.worker``."""
