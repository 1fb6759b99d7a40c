"""The command line: run (the main job, at a small size) and info."""

import subprocess
import sys

from nbmoe.kernels import isa


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nbmoe", *args], capture_output=True, text=True, timeout=600)


def test_run_small_layer_checks_against_reference():
    done = _run("run", "-E", "8", "-k", "2", "-H", "64", "-I", "48", "-r", "4", "-T", "24", "--steps", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"route {isa.runnable()[0]}" in out and "GFLOP/s" in out and "tokens/s" in out
    assert "check: 8 sampled tokens vs float64 reference" in out and out.rstrip().endswith("OK")
    assert "steps [" in done.stderr                    # the progress bar


def test_info_prints_route_and_threads():
    done = _run("info")
    assert done.returncode == 0, done.stderr
    for key in ("route ", "features", "threading_layer", "threads"):
        assert key in done.stdout


def test_bad_flag_is_a_usage_error():
    done = _run("run", "--experts", "many")
    assert done.returncode == 2 and "invalid int value" in done.stderr


def test_finetune_prints_the_loss_curve_and_speed():
    done = _run("finetune", "--steps", "4", "--batch", "2", "--length", "16", "--rank", "4")
    assert done.returncode == 0, done.stderr
    assert "loss curve (step: loss): 1:" in done.stdout and "training tokens/s: nbmoe experts" in done.stdout


def test_commands_needing_torch_say_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from nbmoe.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["finetune"]) == 2
    assert "this command needs torch: pip install torch==2.13.0" in capsys.readouterr().err
