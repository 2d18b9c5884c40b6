"""Every stage's configuration: composition imports no model code, typos fail at composition, and
each preset composes to the values it states (the paper's recipe, the tiny CPU run)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_prep", "train", "perplexity", "simulate", "intrinsic", "table")


def test_composing_every_stage_config_imports_no_model_code():
    # A fresh interpreter: this test process has long imported torch through the fixtures.
    script = textwrap.dedent(f"""
        import sys
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf
        import data_prep.config, train.config, evaluate.config, evaluate.simulate_config
        for stage in {STAGES!r}:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str({str(REPO / "conf")!r} + "/" + stage), version_base="1.3"):
                # data_prep's output_dir holds ${{hydra:...}}, resolved only inside a Hydra run
                cfg = compose(config_name="config", overrides=["experiment=paper", "output_dir=out"])
            OmegaConf.to_container(cfg, resolve=True)
        heavy = [name for name in ("torch", "transformers", "datasets") if name in sys.modules]
        assert not heavy, f"composing the configs imported {{heavy}}"
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
