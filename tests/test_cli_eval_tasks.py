"""`gpt2lab eval --task`: lm-evaluation-harness tasks through gpt2lab's adapter, from the command line.

The model and the local task files come from conftest's `harness_files` (shared with test_lm_eval.py); lm-eval's hub
datasets are unreachable here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import HarnessFiles
from gpt2lab.cli import EVAL_RESULTS_FORMAT, main

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture, code: int = 1) -> str:
    """Run `gpt2lab argv`, expect it to fail with `code`, and return its one stderr line."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def table_values(table: str) -> dict[tuple[str, str], float]:
    """{(task, metric): value} from lm-eval's markdown table (a task's name is on its first row only)."""
    values, task = {}, ""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[4] not in ("Metric", "") and not set(cells[0]) <= set("-:"):
            task = cells[0] or task
            values[task, cells[4]] = float(cells[6])
    return values


def test_prints_the_scores_simple_evaluate_gives_and_writes_the_results(
        harness_files: HarnessFiles, offline: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    from lm_eval.tasks import TaskManager

    from gpt2lab.lm_eval import HarnessModel

    model_dir, tasks = harness_files
    direct = lm_eval.simple_evaluate(model=HarnessModel(str(model_dir)), tasks=["tiny_mc", "tiny_roll"],
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                     log_samples=False)["results"]
    out = tmp_path / "results.json"
    command = ["eval", "--model", str(model_dir), "--task", "tiny_mc", "tiny_roll", "--include-path", str(tasks),
               "--output-path", str(out)]

    assert main(command) == 0
    shown = table_values(capsys.readouterr().out)  # lm-eval's own table, 4 decimals
    assert shown[("tiny_mc", "acc")] == pytest.approx(direct["tiny_mc"]["acc,none"], abs=5e-5)
    assert shown[("tiny_roll", "bits_per_byte")] == pytest.approx(direct["tiny_roll"]["bits_per_byte,none"], abs=5e-5)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["format"] == EVAL_RESULTS_FORMAT and written["results"] == direct

    # again as JSON, replacing the results file it wrote, on the thread count given
    threads = torch.get_num_threads()
    try:
        assert main([*command, "--json", "--overwrite", "--batch-size", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1  # --threads reaches the adapter, which sets torch's count
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"]["tiny_mc"]["acc,none"] == direct["tiny_mc"]["acc,none"]
    assert printed["results"]["tiny_roll"]["bits_per_byte,none"] == pytest.approx(
        direct["tiny_roll"]["bits_per_byte,none"], rel=1e-6)  # batch size 1: other sums, the same scores
    assert json.loads(out.read_text(encoding="utf-8")) == printed


def test_an_unknown_task_is_one_line_saying_what_to_do(harness_files: HarnessFiles, offline: None,
                                                      capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    model_dir, tasks = harness_files
    err = one_line_error(["eval", "--model", str(model_dir), "--task", "tiny_mc", "tiny_mcq", "--include-path",
                          str(tasks)], capsys)
    assert "unknown task 'tiny_mcq'" in err and "did you mean tiny_mc," in err
    assert "lm-eval ls tasks" in err and "--include-path" in err


def test_results_never_replace_a_file_gpt2lab_did_not_write(harness_files: HarnessFiles, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n', encoding="utf-8")
    err = one_line_error(["eval", "--model", str(harness_files.model_dir), "--task", "tiny_mc", "--include-path",
                          str(harness_files.tasks), "--output-path", str(notes), "--overwrite"], capsys)
    assert "is not a results file written by gpt2lab" in err
    assert notes.read_text(encoding="utf-8") == '{"mine": true}\n'


def test_an_earlier_results_file_is_replaced_only_with_overwrite(harness_files: HarnessFiles, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"format": EVAL_RESULTS_FORMAT, "results": {}}), encoding="utf-8")
    err = one_line_error(["eval", "--model", str(harness_files.model_dir), "--task", "tiny_mc", "--include-path",
                          str(harness_files.tasks), "--output-path", str(earlier)], capsys)
    assert "already exists; pass --overwrite" in err


def test_without_lm_eval_one_line_names_the_install(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    err = one_line_error(["eval", "--task", "hellaswag"], capsys)
    assert 'pip install -e ".[eval]"' in err


@pytest.mark.parametrize("argv,flag,allowed", [
    (["eval", "--task", "x", "--limit", "0"], "--limit", "a fraction in (0, 1)"),
    (["eval", "--task", "x", "--limit", "1.5"], "--limit", "a whole number of examples >= 1"),
    (["eval", "--task", "x", "--limit", "nan"], "--limit", "a whole number of examples >= 1"),
    (["eval", "--task", "x", "--num-fewshot", "-1"], "--num-fewshot", ">= 0"),
    (["eval", "--task", "x", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["eval", "--task", "x", "--include-path", ""], "--include-path", "must not be empty"),
    (["eval", "--task", "x", "--output-path", ""], "--output-path", "must not be empty"),
    (["eval", "--task", ""], "--task", "must not be empty"),
    (["eval", "--task"], "--task", "expected at least one argument"),
    (["eval", "--task", "x", "--data", "a.txt"], "--data", "not allowed with argument --task"),
    (["eval"], "--data", "one of the arguments --data --task is required"),
])
def test_bad_flags_are_one_line_naming_the_flag(argv: list[str], flag: str, allowed: str,
                                                capsys: pytest.CaptureFixture) -> None:
    err = one_line_error(argv, capsys, code=2)
    assert err.startswith("gpt2lab eval: error:") and flag in err and allowed in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--task", "x", "--stride", "8"], "--stride does not apply to --task evaluation"),
    (["eval", "--task", "x", "--context", "8", "--no-progress"], "--context, --no-progress do not apply to --task"),
    (["eval", "--data", "a.txt", "--limit", "3"], "--limit does not apply to --data evaluation"),
    (["eval", "--data", "a.txt", "--output-path", "r.json"], "--output-path does not apply to --data"),
    (["eval", "--task", "x", "--include-path", "no-such-dir"], "--include-path 'no-such-dir' is not a directory"),
])
def test_flags_of_the_other_evaluation_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_dtype_is_one_line(harness_files: HarnessFiles, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    err = one_line_error(["eval", "--model", str(harness_files.model_dir), "--task", "tiny_mc", "--dtype", "fp16"],
                         capsys, code=2)  # refused while the arguments are read, before lm-eval's task index
    assert "--dtype: invalid choice: 'fp16'" in err


def test_a_task_lm_eval_cannot_run_is_one_line(harness_files: HarnessFiles, offline: None, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
    model_dir, _ = harness_files
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "bad_template.yaml").write_text(  # the template names a field the documents lack
        f"task: bad_template\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood\ndoc_to_text: "{{question}}"\ndoc_to_target: " x"\n'
        "metric_list:\n  - metric: acc\n")
    assert main(["eval", "--model", str(model_dir), "--task", "bad_template", "--include-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err  # lm-eval's datasets may print progress before it
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("gpt2lab eval: error: lm-eval failed on --task bad_template: UndefinedError: "
                                    "'question' is undefined")
