"""Hydra entry point of `python -m data_prep`; the work is in data_prep.pipeline.run."""

import os

# Arrow's allocator (mimalloc) hands freed pages back to the OS at once, not 10 ms later: loading
# WildChat-1M's parquet frees decoded batches faster than that, and the main process's peak held
# 0.3 GiB of them. Read when pyarrow loads, so it is set before any import does.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

import hydra  # noqa: E402

import data_prep.config  # noqa: F401,E402  (registers the config schema)
from data_prep.pipeline import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf/data_prep", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
