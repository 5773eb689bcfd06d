"""The lm-eval adapter (gpt2lab.lm_eval) against lm-eval's own `--model hf` on the same export.

The model and the local task files come from conftest's `harness_files` (shared with test_cli_eval_tasks.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")

from conftest import HARNESS_STOPS as STOPS, HARNESS_TEXT as TEXT, HarnessFiles  # noqa: E402
from conftest import assert_same_lm_eval_scores, lm_eval_responses  # noqa: E402
from gpt2lab.lm_eval import HarnessModel, scoring_windows  # noqa: E402

TASKS = ["tiny_mc", "tiny_roll", "tiny_gen"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _evaluate(model: object, tasks: Path, **kwargs: object) -> dict:
    from lm_eval.tasks import TaskManager

    os.environ.update(OFFLINE)
    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path=str(tasks)),
                                   log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def hf_results(harness_files: HarnessFiles) -> dict:
    pytest.importorskip("accelerate", reason="lm-eval's --model hf needs accelerate (in the test extra)")
    model_dir, tasks = harness_files
    return _evaluate("hf", tasks, model_args=f"pretrained={model_dir}", batch_size=3, device="cpu")


def test_equals_hf_on_every_request_type(harness_files: HarnessFiles, hf_results: dict) -> None:
    model_dir, tasks = harness_files
    ours = _evaluate(HarnessModel(str(model_dir), batch_size=3), tasks)
    for task in ("tiny_mc", "tiny_roll"):
        for mine, theirs in zip(lm_eval_responses(ours, task), lm_eval_responses(hf_results, task), strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a, b = (a[0] if isinstance(a[0], (list, tuple)) else a), (b[0] if isinstance(b[0], (list, tuple)) else b)
                assert a[0] == pytest.approx(b[0], abs=1e-4)
                if task == "tiny_mc":
                    assert a[1] == b[1]  # is_greedy
    assert_same_lm_eval_scores(ours, hf_results, "tiny", STOPS)


def test_is_greedy_true_where_the_model_predicts_the_continuation(harness_files: HarnessFiles) -> None:
    from lm_eval.api.instance import Instance

    model_dir, _ = harness_files
    lm = HarnessModel(str(model_dir))
    greedy = lm.generate_until([Instance("generate_until", {}, ("The dog ran", {"until": ["."], "max_gen_toks": 6}),
                                         0)])[0]
    assert greedy
    logprob, is_greedy = lm.loglikelihood([Instance("loglikelihood", {}, ("The dog ran", greedy), 0)])[0]
    assert is_greedy and logprob < 0
    _, other = lm.loglikelihood([Instance("loglikelihood", {}, ("The dog ran", " blue blue"), 0)])[0]
    assert not other


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_low_precision_scores_stay_close(harness_files: HarnessFiles, dtype: str) -> None:
    from lm_eval.api.instance import Instance

    model_dir, _ = harness_files
    requests = [Instance("loglikelihood", {}, ("The cat sat on the", " mat."), 0),
                Instance("loglikelihood", {}, ("Q: What do cows say? A:", " moo."), 1)]
    exact = [lp for lp, _ in HarnessModel(str(model_dir)).loglikelihood(requests)]
    approx = [lp for lp, _ in HarnessModel(str(model_dir), dtype=dtype).loglikelihood(requests)]
    assert approx == pytest.approx(exact, abs=0.1)


def test_batching_does_not_change_scores(harness_files: HarnessFiles) -> None:
    from lm_eval.api.instance import Instance

    model_dir, _ = harness_files
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in
                enumerate([TEXT * 2, "The cat", "Is it raining? " * 12])]
    one = HarnessModel(str(model_dir), batch_size=1).loglikelihood_rolling(requests)
    many = HarnessModel(str(model_dir), batch_size=8).loglikelihood_rolling(requests)
    assert many == pytest.approx(one, abs=1e-4)
    assert all(math.isfinite(x) and x < 0 for x in one)


def test_module_command_line_registers_the_model(harness_files: HarnessFiles, tmp_path: Path) -> None:
    model_dir, tasks = harness_files
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-m", "gpt2lab.lm_eval", "--model", "gpt2lab", "--model_args",
           f"pretrained={model_dir},dtype=fp32", "--tasks", "tiny_mc", "--include_path", str(tasks),
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and json.loads(results[0].read_text())["config"]["model"] == "gpt2lab"


def test_a_cuda_device_without_cuda_falls_back_to_the_cpu(harness_files: HarnessFiles) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for machines without it")
    assert HarnessModel(str(harness_files.model_dir), device="cuda:0").device.type == "cpu"


def test_scoring_windows_keep_the_context_tail() -> None:
    assert scoring_windows([(None, [1, 2], [3, 4])], max_length=8) == [([1, 2, 3], [3, 4])]
    # too long: the window keeps the last max_length inputs, all continuation tokens still scored
    assert scoring_windows([(None, [1, 2, 3, 4], [5, 6])], max_length=3) == [([3, 4, 5], [5, 6])]
    with pytest.raises(ValueError, match="empty continuation"):
        scoring_windows([(None, [1], [])], max_length=4)


@pytest.mark.parametrize("args, match", [
    ({"dtype": "fp16"}, "unknown dtype 'fp16'"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": "many"}, "batch_size must be an integer >= 1, got 'many'"),
    ({"max_length": 10_000}, "at most the model's n_ctx=64"),
])
def test_bad_arguments_name_the_value(harness_files: HarnessFiles, args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HarnessModel(str(harness_files.model_dir), **args)
