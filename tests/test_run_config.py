"""`python -m vlm_lab.train CONFIG` / `vlm-lab train CONFIG`: config files (TOML, JSON, built-in names), `--set`
overrides, clear errors, and one real `torchrun --nproc_per_node=2` FSDP run whose per-step losses equal the
single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from vlm_lab.cli import main as cli_main
from vlm_lab.train.run import load_config, main, run

TINY = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "evaluate=false",
        "model_config.vision_layers=1", "model_config.text_layers=1"]


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", text)]


def test_toml_json_and_builtin_configs(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "clip"\npreset = "toy"\n[train]\nsteps = 7\nparallel = "fsdp"\n[model_config]\n'
                    'vision_layers = 1\n')
    cfg = load_config(toml)
    assert cfg["train"] == {"steps": 7, "parallel": "fsdp"} and cfg["model_config"] == {"vision_layers": 1}
    js = tmp_path / "run.json"
    js.write_text(json.dumps(cfg))
    assert load_config(js) == cfg
    assert load_config("clip-vit-b16")["model_config"] == {"variant": "ViT-B/16"}
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "clip"\nbatch = 3\n')
    with pytest.raises(ValueError, match="unknown key"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_config(tmp_path / "missing.toml")


def test_run_matches_torchrun_fsdp_on_two_processes_and_rejects_bad_fields(tmp_path, capsys):
    """In-process run (1 process, batch 8) vs `torchrun --nproc_per_node=2 -m vlm_lab.train` (FSDP2 with activation
    checkpointing, 2 x 4): the same per-step losses (printed to 4 decimals)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "vlm_lab.train", "clip-toy", "--set", f"out_dir={tmp_path / 'two'}",
                            "--set", "train.parallel=fsdp", "--set", "train.batch_size=4",
                            "--set", "train.activation_checkpointing=true"]
                           + [a for s in TINY if "batch_size" not in s for a in ("--set", s)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out = run("clip-toy", TINY + [f"out_dir={tmp_path / 'one'}"])
        assert len(out["history"]) == 3 and out["checkpoint"].name == "step_00000003.safetensors"
        assert (tmp_path / "one" / "tokenizer").is_dir()
        assert main(["clip-toy", "--set", "train.bogus=1"]) == 2
        assert "bogus" in capsys.readouterr().err
        assert main(["clip-toy", "--set", "train.parallel=zero3"]) == 2
        stdout, stderr = two.communicate(timeout=180)
    finally:
        if two.poll() is None:
            two.kill()
    assert two.returncode == 0, stderr[-3000:]
    assert "on 2 process(es), parallel=fsdp" in stdout and "global batch 8" in stdout
    l1, l2 = [r["loss"] for r in out["history"]], _losses(stdout)
    assert l2 == pytest.approx(l1, abs=1.5e-4), (l1, l2)
    assert (tmp_path / "two" / "step_00000003.safetensors").is_file()


def test_cli_train_accepts_a_run_config(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "clip"\nout_dir = "{tmp_path / "cli"}"\n[train]\nsteps = 2\nbatch_size = 8\n'
                   '[model_config]\nvision_layers = 1\ntext_layers = 1\n')
    assert cli_main(["train", str(cfg), "--set=train.log_every=1"]) == 0
    assert (tmp_path / "cli" / "step_00000002.safetensors").is_file()
