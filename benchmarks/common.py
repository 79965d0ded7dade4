"""What the benchmark scripts share. They import it as `common`: a script's own folder is first on
Python's path when it runs."""
from __future__ import annotations

import statistics
import time


def start_jax() -> None:
  """What every benchmark process does before JAX starts, as the commands do: the CPU alone where
  libtpu is installed on a machine without TPU chips (`cvt_flax.runtime.platforms`)."""
  from cvt_flax.runtime import platforms  # pylint: disable=import-outside-toplevel
  platforms.cpu_only_without_accelerator()


def wall_times(run, steps: int) -> list[float]:
  """The wall seconds of `steps` calls of `run`, after one untimed call (the warm-up, and for JAX
  the first execution after compiling)."""
  run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def median_seconds(run, steps: int) -> float:
  return statistics.median(wall_times(run, steps))
