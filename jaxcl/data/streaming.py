"""Step-indexed batches read by several threads at once: pre-training from a slice store.

`StreamedBatches` wraps a `pipeline.StepBatches` whose pool is a `slice_store.SliceStore` and
yields exactly its batches, ``batches[k]`` for ``k = start_step, start_step + 1, ...``: a pool of
``parallelism`` threads reads upcoming steps (each the pipeline's plan for (seed, k), then the
store's reads), and the batches come out in step order. Reading is mostly waiting for the files
(ArrayRecord releases the GIL while it reads), so several steps in flight keep a device fed from
local disk or ``gs://``. Resuming needs no iterator state: a restarted run passes its restored
step as ``start_step``.

Why threads and not tf.data: the records are read by ArrayRecord, not by TensorFlow ops, so
tf.data would only wrap the same Python reads in ``tf.numpy_function`` calls; measured on this
2-core host (benchmarks/input_streaming.py) that was slower than plain threads at every
parallelism, and an unfinished tf.data iterator of Python functions can hang the interpreter at
exit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Iterator

from jaxcl.data import pipeline


class StreamedBatches:
    """``batches[k]`` as `pipeline.StepBatches` gives it, iterated with parallel reads.

    Attributes:
      batches: the step-indexed batches (plans and reads).
      parallelism: steps read at the same time, each by its own thread.
    """

    def __init__(self, batches: pipeline.StepBatches, *, parallelism: int):
        if parallelism < 1:
            raise ValueError(f"parallelism={parallelism}: use 1 or more steps read at once.")
        self.batches = batches
        self.parallelism = parallelism

    def __getitem__(self, step: int) -> pipeline.Batch:
        return self.batches[step]

    def iterate(self, start_step: int = 0, prefetch: int = 2) -> Iterator[pipeline.Batch]:
        """Yields the batches of steps ``start_step, start_step + 1, ...`` forever.

        Args:
          start_step: first step (a resumed run passes its restored step).
          prefetch: finished batches kept ready ahead of the consumer, besides those in flight.
        """
        steps = itertools.count(start_step)
        workers = concurrent.futures.ThreadPoolExecutor(
            self.parallelism, thread_name_prefix="jaxcl-reads"
        )
        try:
            ahead = self.parallelism + prefetch
            pending = collections.deque(
                workers.submit(self.batches.__getitem__, step)
                for step in itertools.islice(steps, ahead)
            )
            while True:
                batch = pending.popleft().result()  # a failed read raises here
                pending.append(workers.submit(self.batches.__getitem__, next(steps)))
                yield batch
        finally:
            workers.shutdown(wait=False, cancel_futures=True)
