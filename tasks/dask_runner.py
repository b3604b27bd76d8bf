"""Running a library's jobs as Prefect tasks on a Dask cluster (prefect-dask)."""
from __future__ import annotations

from tasks.common import retry_worthwhile


def dask_map(address: str, stage: str):
    """A `map_fn` running each job as a Prefect task (`{stage}-{function name}`) on the Dask cluster at `address`."""
    def run(function, jobs, on_done=None):
        from prefect_dask import DaskTaskRunner

        from prefect import task

        remote = task(function, name=f"{stage}-{function.__name__.replace('_', '-')}", retries=1,
                      retry_condition_fn=retry_worthwhile)
        with DaskTaskRunner(address=address) as runner:
            futures = [runner.submit(remote, {"job": job}) for job in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                if on_done:
                    on_done(results[-1])
        return results
    return run
