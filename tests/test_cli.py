"""The `vlm-lab` command line: doctor, lab, argument errors (exit code 2), and train/eval end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vlm_lab import cli


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run `vlm-lab ARGV` in-process; return (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:  # argparse and usage errors exit through SystemExit
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------ doctor


def test_doctor_reports_versions_device_threads_offline_and_assets(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("VLM_LAB_ASSETS", str(tmp_path))
    code, out, _ = run_cli(capsys, "doctor", "--no-network-check", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["torch"] == torch.__version__.split("+")[0] or torch.__version__.startswith(report["torch"])
    assert report["transformers"] != "not installed"
    assert report["device"].startswith("cuda" if torch.cuda.is_available() else ("cpu", "mps"))
    assert report["torch_threads"] == torch.get_num_threads()
    assert report["offline"].startswith("yes")  # conftest sets HF_HUB_OFFLINE=1
    assert report["network"].startswith("not checked")
    assert report["assets"] == str(tmp_path)


def test_doctor_plain_text_lists_every_key(capsys):
    code, out, _ = run_cli(capsys, "doctor", "--no-network-check")
    assert code == 0
    for key in ("vlm_lab", "python", "torch", "device", "torch_threads", "offline", "assets", "hf_cache"):
        assert any(line.split()[0] == key for line in out.splitlines()), key


def test_assets_dir_defaults_to_the_repository(monkeypatch):
    monkeypatch.delenv("VLM_LAB_ASSETS", raising=False)
    assert cli.assets_dir() == cli.repo_root() / "assets"
    assert (cli.repo_root() / "vlm_lab" / "cli.py").is_file()


def test_network_check_is_fast_and_reports_unreachable_under_the_guard():
    start = time.monotonic()
    status = cli.network_check(timeout=1.0)
    assert time.monotonic() - start < 3.0
    assert status.startswith("unreachable"), status


def test_network_guard_blocks_remote_and_allows_loopback():
    remote = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(RuntimeError, match="must not use the network"):
        remote.connect(("203.0.113.7", 443))  # TEST-NET-3: would hang or fail, never reach anyone
    remote.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


# --------------------------------------------------------------------------------------------------------- lab


def test_lab_dry_run_binds_to_loopback_with_a_token(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "lab", "--dry-run", "--port", "8899", "--notebook-dir", str(tmp_path))
    assert code == 0
    assert "--ip=127.0.0.1" in out and "--port=8899" in out and "--no-browser" in out
    assert f"--ServerApp.root_dir={tmp_path}" in out
    assert "--IdentityProvider.token=" in out
    assert ("--allow-root" in out) == (hasattr(os, "geteuid") and os.geteuid() == 0)


def test_lab_rejects_a_missing_notebook_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "lab", "--dry-run", "--notebook-dir", str(tmp_path / "nope"))
    assert code == 2
    assert "--notebook-dir" in err


# ----------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["frobnicate"], "invalid choice"),
        (["train"], "model"),
        (["train", "no-such-model"], "no recipe for 'no-such-model'"),
        (["train", "clip", "--preset", "gigantic"], "--preset"),
        (["train", "clip", "--steps", "0"], "--steps"),
        (["train", "clip", "--batch-size", "-3"], "--batch-size"),
        (["train", "clip", "--steps", "many"], "invalid int value"),
        (["eval", "clip"], "--checkpoint"),
        (["eval", "no-such-model", "--checkpoint", "x.safetensors"], "no recipe"),
    ],
)
def test_usage_errors_exit_2_with_a_message_naming_the_problem(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert fragment in err


def test_eval_missing_checkpoint_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "clip", "--checkpoint", str(tmp_path / "missing.safetensors"))
    assert code == 2
    assert "--checkpoint" in err and "does not exist" in err


def test_resume_without_a_run_folder_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "clip", "--out", str(tmp_path / "never"), "--resume")
    assert code == 2
    assert "--resume" in err


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run([sys.executable, "-m", "vlm_lab", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip().startswith("vlm-lab ")


def test_eval_rejects_a_file_that_is_not_safetensors(capsys, tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    (tmp_path / "tokenizer").mkdir()
    code, _, err = run_cli(capsys, "eval", "clip", "--checkpoint", str(bogus))
    assert code == 2
    assert "--checkpoint" in err


# ---------------------------------------------------------------------------------------------------- recipes


def test_recipe_train_config_uses_preset_defaults_and_cli_overrides(tmp_path):
    from vlm_lab.train.recipes import get_recipe

    recipe = get_recipe("clip")
    config = recipe.train_config("toy", out_dir=tmp_path, steps=7, batch_size=None, seed=3, resume=False)
    assert config.steps == 7 and config.seed == 3 and config.out_dir == tmp_path
    assert config.batch_size == recipe.train_defaults["toy"]["batch_size"]  # None means "the preset's"
    assert config.warmup_steps <= config.steps  # shortened runs shorten warmup instead of failing
    with pytest.raises(ValueError, match="preset"):
        recipe.train_config("paper")
    with pytest.raises(KeyError, match="expected one of clip"):
        get_recipe("clipp")


# ------------------------------------------------------------------------------------------- train / eval e2e


@pytest.mark.slow
def test_train_then_eval_round_trip_and_resume(capsys, tmp_path):
    out = tmp_path / "clip-toy"
    code, stdout, err = run_cli(capsys, "train", "clip", "--preset", "toy", "--out", str(out),
                                "--steps", "2", "--batch-size", "8", "--seed", "1")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer").is_dir()
    saved = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= saved["zero_shot_top1_heldout"] <= 1.0
    assert "zero_shot_top1_heldout" in stdout and "vlm-lab eval clip --checkpoint" in stdout

    code, stdout, err = run_cli(capsys, "eval", "clip", "--checkpoint", str(out / "model.safetensors"), "--json")
    assert code == 0, err
    reloaded = json.loads(stdout)
    assert reloaded.keys() == saved.keys()
    for key, value in saved.items():  # same weights, same tokenizer, same eval set -> same numbers
        assert reloaded[key] == pytest.approx(value, abs=1e-6), key

    code, _, err = run_cli(capsys, "train", "clip", "--out", str(out), "--steps", "3", "--batch-size", "8",
                           "--seed", "1", "--resume")
    assert code == 0, err
    assert any(p.name.startswith("step_") and "3" in p.name for p in out.iterdir())
