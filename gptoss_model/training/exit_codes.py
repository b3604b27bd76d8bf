"""What the training entry's exit code says (torchrun reports each rank's as "exitcode: N"), so a
launcher can tell a retry that would fail the same way from one that resumes.

`python -m gptoss_model.train` exits with these; `training.launch.supervise` reads them back.
"""

EXIT_CONFIG = 2  # the config was refused
EXIT_NONFINITE = 3  # loss or gradient norm became NaN/Inf; nothing was saved after the last good step
EXIT_HANG = 4  # a rank made no progress for train.hang_timeout (training.watchdog): a retry resumes
EXIT_REPLICAS = 5  # replicated parameters disagree across ranks: a parallelism bug, not a transient
EXIT_PERMANENT = 6  # any other error a retry cannot fix (an unreadable or tampered checkpoint, bad data)
EXIT_SAVED = 7  # train.stop_file appeared: a checkpoint was saved and the run stopped (a restart resumes)
