"""Hydra entry point of `python -m data_prep`; the work is in data_prep.pipeline.run."""

import hydra

import data_prep.config  # noqa: F401  (registers the config schema)
from data_prep.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf/data_prep", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
