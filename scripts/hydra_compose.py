"""Compose a stage's config as its Hydra main would, without running it: for the tests, the
benchmarks and notebooks.

    from scripts.hydra_compose import compose_config
    cfg = compose_config("simulate", ["experiment=tiny", "intents.limit=4"])   # conf/simulate/config.yaml

A stage whose schema module is not imported yet needs it imported first (evaluate.simulate_config,
evaluate.config, train.config); data_prep's is registered here.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(stage: str, overrides: list[str], config_name: str = "config"):
    """Compose conf/<stage>/<config_name>.yaml with overrides, as the stage's Hydra main would."""
    import data_prep.config  # noqa: F401  (registers the data_prep schema)
    with initialize_config_dir(config_dir=str(CONF / stage), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
