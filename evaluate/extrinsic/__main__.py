"""`python -m evaluate.extrinsic`: see evaluate.extrinsic.run."""

import hydra

from evaluate.extrinsic.run import run


@hydra.main(version_base="1.3", config_path="../../conf/extrinsic", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
