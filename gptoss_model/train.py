"""`python -m gptoss_model.train CONFIG.yaml [key.sub=value ...]`: one training run (under torchrun).

CONFIG is a YAML run config (see configs/) or a recipe name (`recipe:tiny_pretrain`);
overrides follow as dotted keys. Without torchrun it runs as a world of one.

    torchrun --nproc-per-node 2 -m gptoss_model.train configs/tiny_pretrain.yaml \\
        parallelism.expert_model_parallel_size=2 train.train_iters=30
"""

from __future__ import annotations

import logging
import sys

from gptoss_model.errors import PermanentError
from gptoss_model.settings import settings
from gptoss_model.training.config import ConfigError, RunConfig, apply_overrides, load_yaml
from gptoss_model.training.exit_codes import EXIT_CONFIG, EXIT_NONFINITE, EXIT_PERMANENT, EXIT_REPLICAS, EXIT_SAVED


def load_run_config(source: str, overrides: list[str]) -> RunConfig:
    if source.startswith("recipe:"):
        from gptoss_model.training.recipes import recipe

        run = recipe(source.removeprefix("recipe:"))
    else:
        run = load_yaml(source)
    return apply_overrides(run, overrides)


def die_with_torchrun() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when torchrun dies.

    torchrun starts ranks in their own sessions: without this a killed torchrun
    leaves its ranks training (and writing checkpoints) as orphans. (torchrun may be a
    container's PID 1, so an orphan is told by its parent changing, not by PPID 1.)"""
    if settings().torchelastic_run_id is not None:
        from gptoss_model.system.processes import die_with_parent

        die_with_parent()


def _refuse(error: Exception, code: int) -> int:
    """Every rank meets the same error; one of them (rank 0) says it."""
    if settings().rank in (None, 0):
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    die_with_torchrun()
    from gptoss_model.training.launch import guard_process_group

    guard_process_group()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run = load_run_config(argv[0], argv[1:])
    except ConfigError as e:
        return _refuse(e, EXIT_CONFIG)
    from gptoss_model.training.loop import NonFiniteLossError, SavedToStop, train
    from gptoss_model.training.replicas import ReplicaDivergenceError

    try:
        train(run)
    except ConfigError as e:
        return _refuse(e, EXIT_CONFIG)
    except SavedToStop as e:
        print(f"stopped: {e}", flush=True)
        return EXIT_SAVED
    except NonFiniteLossError as e:
        return _refuse(e, EXIT_NONFINITE)
    except ReplicaDivergenceError as e:
        return _refuse(e, EXIT_REPLICAS)
    except PermanentError as e:
        return _refuse(e, EXIT_PERMANENT)
    finally:
        from gptoss_model.model import parallel

        parallel.destroy()
    return 0


if __name__ == "__main__":  # the guard matters: torch_dist's checkpoint writer re-imports __main__
    sys.exit(main())
