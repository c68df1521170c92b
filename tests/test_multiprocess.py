"""`examples/train.py` under `accelerate launch` with 2 processes on CPU (DDP over gloo), with the shipped config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ACCELERATE_LAUNCH, build_model
from peft import PeftModel
from tensorboard.backend.event_processing import event_accumulator
from transformers import AutoModelForImageClassification

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"
DIGEST = re.compile(r"\[process (\d+)/(\d+)\] adapter sha256 ([0-9a-f]{64})")


def test_two_processes_train_one_adapter(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    model_dir = tmp_path / "model"
    model = build_model("resnet-basic", num_labels=10)
    model.config.image_size = 32
    model.save_pretrained(model_dir)
    output = tmp_path / "run"
    command = [*ACCELERATE_LAUNCH, "--config_file", str(CONFIG), str(ROOT / "examples" / "train.py")]
    command += ["--model", str(model_dir), "--block", "stage1", "--lr", "0.01", "--train-n", "40", "--eval-n", "20"]
    command += ["--epochs", "1", "--batch-size", "5", "--output-dir", str(output), "--no-progress"]
    command += ["--report-to", "tensorboard"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Two processes ran as one group, and ended with the same tuned weights although each saw half of the batches.
    digests = sorted(DIGEST.findall(result.stdout))
    assert [(rank, size) for rank, size, _ in digests] == [("0", "2"), ("1", "2")], result.stdout
    assert digests[0][2] == digests[1][2]
    summary = json.loads((output / "metrics.json").read_text())
    assert (summary["num_processes"], summary["adapter_sha256"]) == (2, digests[0][2])
    assert result.stdout.count("Adapter: ") == 1  # only the main process reports (and writes)
    assert result.stdout.count("Data: all 1797 images of digits are the target (no shift): 40 for training") == 1
    # stage1 is on every forward path: DDP is not asked to search for unused parameters, so no rank warns.
    assert "find_unused_parameters" not in result.stderr, result.stderr[-3000:]
    # The main process alone logged the epoch, and both processes ended normally (the trackers are closed without
    # Accelerator.end_training, which destroys the process group the command line still waits on).
    events = event_accumulator.EventAccumulator(str(output / "runs" / "surgical-peft"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("eval/accuracy")] == [
        (1, pytest.approx(summary["metrics"]["eval_accuracy"]))
    ]
    assert len(list((output / "runs" / "surgical-peft").glob("events.out.tfevents.*"))) == 1

    # The saved file holds those weights, and loads as an adapter that changes the model.
    saved = safetensors.torch.load_file(output / "adapter" / "adapter_model.safetensors")
    assert hashlib.sha256(safetensors.torch.save(dict(sorted(saved.items())))).hexdigest() == digests[0][2]
    base = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        before = base(pixel_values=pixel_values).logits
        tuned = PeftModel.from_pretrained(base, output / "adapter").eval()
        after = tuned(pixel_values=pixel_values).logits
    assert not torch.allclose(before, after)
