"""The errors a job reports to its user in one line (the CLI prints them without a traceback)."""


class JobError(Exception):
    """A job cannot run as asked (busy workdir, bad checkpoint, storage failure); exit code 2."""


class TrainingDiverged(Exception):
    """The loss or the gradients became non-finite; the run stops (exit code 1) with no such checkpoint."""


class TrainingStopped(Exception):
    """A signal (SIGTERM, SIGINT) stopped the run after a step and its checkpoint; exit code 3, rerun to resume."""
