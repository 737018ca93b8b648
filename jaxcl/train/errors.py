"""What stops a training run early, kept apart from the loop so entry points need not import it.

`jaxcl.train.loop` raises them; `jaxcl.entry` turns them into exit codes (importing the loop
would import TensorFlow through clu's metric writers, seconds that `python -m jaxcl.predict`
does not need).
"""


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN or infinite loss; the last good checkpoint is kept."""


class PreemptedError(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was written before raising."""
