"""The errors of training: a run that cannot start or resume, and a diverging loss."""


class TrainError(ValueError):
    """A run cannot start or resume (bad configuration, mismatched or corrupt checkpoint)."""


class NonFiniteLoss(RuntimeError):
    """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""
