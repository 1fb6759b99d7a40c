"""The command line: run (the main job, at a small size), info, bench's flags, finetune,
and the progress bar (on a terminal only)."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from nbmoe.__main__ import main
from nbmoe.kernels import isa

SMALL_RUN = ("run", "-E", "8", "-k", "2", "-H", "64", "-I", "48", "-r", "4", "-T", "24", "--steps", "2")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nbmoe", *args], capture_output=True, text=True, timeout=600)


def _run_on_terminal(*args):
    """(returncode, stdout, what a terminal on stderr showed): stdout piped, stderr a
    100-column pty."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "nbmoe", *args], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:                     # EIO: the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    stdout = proc.communicate(timeout=600)[0]
    return proc.returncode, stdout.decode(), shown.decode()


def test_run_small_layer_checks_against_reference():
    done = _run(*SMALL_RUN)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"route {isa.choose_route().name}" in out and "GFLOP/s" in out and "tokens/s" in out
    assert "check: 8 sampled tokens vs float64 reference" in out and out.rstrip().endswith("OK")
    # piped: no progress bar, so no carriage-return lines in a log
    assert "steps" not in done.stderr and "\r" not in done.stdout + done.stderr


def test_progress_bar_on_a_terminal():
    returncode, stdout, shown = _run_on_terminal(*SMALL_RUN)
    assert returncode == 0, shown
    assert "steps: 100%" in shown and "2/2" in shown and "\r" in shown
    assert "\r" not in stdout and stdout.rstrip().endswith("OK")


def test_info_prints_route_and_threads():
    done = _run("info")
    assert done.returncode == 0, done.stderr
    for key in ("route ", "features", "threading_layer", "threads"):
        assert key in done.stdout


def test_bad_flag_is_a_usage_error():
    done = _run("run", "--experts", "many")
    assert done.returncode == 2 and "invalid int value" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--routing", "zipf", "--zipf-s", "-1"], "argument --zipf-s: expected a finite number >= 0, got '-1'"),
    (["--routing", "zipf", "--zipf-s", "nan"], "argument --zipf-s: expected a finite number >= 0, got 'nan'"),
    (["--zipf-s", "2"], "argument --zipf-s: applies to --routing zipf only"),
    (["--routing", "pareto"], "argument --routing: invalid choice: 'pareto'"),
])
def test_bench_routing_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_with_zipf_routing_and_formats_side_by_side():
    done = _run("bench", "-E", "8", "-k", "2", "-H", "64", "-I", "64", "-r", "2", "-T", "4", "16", "--repeat", "1",
                "--routing", "zipf", "--zipf-s", "1.5", "--format", "bf16", "int4_k2")
    assert done.returncode == 0, done.stderr
    assert "routing zipf s=1.5" in done.stdout
    assert "int4_k2 group 32: stored 0 MiB, 0.281 of raw bf16" in done.stdout
    rows = [line.split("|") for line in done.stdout.splitlines() if line.lstrip().startswith(("4 |", "16 |"))]
    assert len(rows) == 8 and {row[2].strip() for row in rows} == {"bf16", "int4_k2"}
    assert all(float(row[6].rstrip("x ")) > 0 for row in rows)                 # speedup against eager
    assert all(float(row[4]) == 1.0 for row in rows if row[2].strip() == "bf16")  # ratio to bf16


@pytest.mark.parametrize("fmt", ["int8", "int4_awq"])
def test_run_quantized_checks_against_the_dequantized_reference(fmt):
    done = _run("run", "-E", "8", "-k", "2", "-H", "64", "-I", "64", "-r", "4", "-T", "24", "--steps", "2",
                "--format", fmt, "--group-size", "32")
    assert done.returncode == 0, done.stderr
    assert f"as {fmt}" in done.stdout and done.stdout.rstrip().endswith("OK")


@pytest.mark.slow
@pytest.mark.parametrize("peft", [[], ["--peft"]], ids=["nbmoe-lora", "peft"])
def test_finetune_prints_the_loss_curve_and_speed(peft):
    done = _run("finetune", "--steps", "4", "--batch", "2", "--length", "16", "--rank", "4", *peft)
    assert done.returncode == 0, done.stderr
    assert "loss curve (step: loss): 1:" in done.stdout and "training tokens/s: nbmoe experts" in done.stdout
    assert ("PEFT LoRA r=4" in done.stdout) == bool(peft)
    assert "training" not in done.stderr and "\r" not in done.stdout + done.stderr


@pytest.mark.slow
def test_finetune_under_torchrun_prints_the_same_curve_per_rank_memory_and_speed():
    args = ["--steps", "3", "--batch", "2", "--length", "16", "--rank", "4"]
    single = _run("finetune", *args)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nbmoe",
                           "finetune", "--tp", "2", "--timeout", "60", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    curve = [line for line in done.stdout.splitlines() if line.startswith("loss curve")]
    assert len(curve) == 1                                  # printed once, by rank 0

    def losses(text):
        line = next(line for line in text.splitlines() if line.startswith("loss curve"))
        return [float(item.split(": ")[1]) for item in line.split("): ")[1].split(", ")]

    assert np.allclose(losses(done.stdout), losses(single.stdout), rtol=0, atol=2e-3)
    assert "training tokens/s: nbmoe experts" in done.stdout and "(2 ranks" in done.stdout
    assert "rank 0: experts stored 12.00 MiB" in done.stdout and "rank 1: experts stored 12.00 MiB" in done.stdout
    assert "experts stored 24.00 MiB" in single.stdout
    wrong = _run("finetune", "--tp", "2", *args)            # not under torchrun
    assert wrong.returncode != 0 and "run it as torchrun --nproc-per-node 2" in wrong.stderr


def test_commands_needing_torch_say_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["finetune"]) == 2
    assert "this command needs torch: pip install torch==2.13.0" in capsys.readouterr().err


def test_memory_prints_growth_against_the_bytes_it_expects():
    done = _run("memory", "--layers", "2", "-E", "4", "-k", "2", "-H", "64", "-I", "64", "-r", "2", "-T", "32",
                "--project", "48")
    assert done.returncode == 0, done.stderr
    per_token = 2 * 64 + 64 + 2 * 20 + 2 * (8 + 4 * 64 + 2 * 64 + 12 * 2)      # docs/design.md §5
    assert f"({per_token} bytes per token per layer)" in done.stdout
    assert "step 1: resident growth after the forwards" in done.stdout and "step 2:" in done.stdout
    assert "projected to 48 layers" in done.stdout
