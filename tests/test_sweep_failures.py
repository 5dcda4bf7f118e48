"""What a sweep says while it runs: each failure on the terminal as it
happens, a stop when every cell would fail the same way (missing data, a bad
setting), a bar that moves with every experience, no report of nothing, and
no stale error.txt beside a finished run."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments import config as C
from experiments.cli import main as cli
from experiments.executors import LocalExecutor, Slot
from experiments.sweep import NOT_STARTED, run_sweep

from .executor_calls import fail_first
from .fakedata import write_mnist

SWEEP = """
[base]
benchmark = "permuted_mnist"
preset = "smoke"
strategy = "naive"
train_per_class = 6
test_per_class = 2
data_root = "{root}"
download = false
threads = 1

[grid]
optimizer = ["adam"]
seed = [0, 1, 2]
"""


def sweep_file(tmp_path: Path, root: Path, text: str = SWEEP) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text.format(root=root))
    return path


def test_missing_data_stops_the_sweep_with_one_line_and_a_rerun_clears_the_error(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "runs"
    spec = sweep_file(tmp_path, root)
    assert cli(["sweep", str(spec), "--out", str(out), "--report"]) == 2
    captured = capsys.readouterr()
    stops = [line for line in captured.err.splitlines() if "stopped" in line]
    assert len(stops) == 1, captured.err
    assert stops[0].startswith("sweep: stopped: every run would fail the same way: DataNotFoundError: MNIST is not "
                               f"in {root / 'MNIST' / 'raw'} (no such folder) and could not be downloaded")
    assert "error.txt" in stops[0] and "Traceback" not in captured.err
    assert "1 failed in the run, 2 not started" in captured.out
    assert [p.parent.name for p in out.rglob("error.txt")] == ["seed0"], "the other cells never started"
    assert not (out / "report").exists(), "no report of a sweep where no run finished"
    assert "no finished run under" in captured.err and "no report written" in captured.err

    write_mnist(root, n_train=60, n_test=20)
    assert cli(["sweep", str(spec), "--out", str(out)]) == 0
    assert len(list(out.rglob("metrics.json"))) == 3
    assert not list(out.rglob("error.txt")), "a run that succeeded keeps no error.txt of an earlier failure"


def test_a_failure_of_one_cell_is_printed_at_once_and_the_others_run(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=60, n_test=20)
    text = SWEEP.replace('seed = [0, 1, 2]', 'seed = [0]\nlr = [1e30, 0.001]')  # the first one's loss overflows
    out = tmp_path / "runs"
    assert cli(["sweep", str(sweep_file(tmp_path, root, text)), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    first = [line for line in captured.err.splitlines() if line.startswith("sweep: ") and "failed" in line]
    assert len(first) == 1 and "failed in the run: NonFiniteLossError" in first[0], captured.err
    assert "lr1e+30" in first[0] and "error.txt" in first[0] and "every run would fail" not in captured.err
    assert "1 done, 1 failed in the run" in captured.out


def test_the_same_failure_is_printed_once_in_full(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=60, n_test=20)
    text = SWEEP.replace('seed = [0, 1, 2]', 'seed = [0, 1]\nlr = [1e30]')  # every loss overflows alike
    out = tmp_path / "runs"
    assert cli(["sweep", str(sweep_file(tmp_path, root, text)), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("NonFiniteLossError: the training loss became NaN or Inf") == 2, err  # at once, then summed up
    assert f"{out / 'permuted_mnist-smoke/naive/adam-lr1e+30/seed1'}: the same failure" in err


def test_report_of_a_folder_without_finished_runs_writes_nothing(tmp_path, capsys):
    (tmp_path / "runs" / "cell").mkdir(parents=True)
    (tmp_path / "runs" / "cell" / "error.txt").write_text("boom")
    assert cli(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cl-cm: error: no finished run under") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "report").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_bar_moves_with_every_experience(tmp_path, jobs):
    root = write_mnist(tmp_path / "data", n_train=60, n_test=20)
    spec = C.tomllib.loads(SWEEP.format(root=root).replace("seed = [0, 1, 2]", "seed = [0, 1]"))
    out = tmp_path / "runs"
    seen: list[tuple[str, int, int]] = []
    statuses = run_sweep(spec, out, jobs=jobs, progress=False,
                         on_experience=lambda folder, done, total: seen.append((folder, done, total)))
    assert sorted(statuses.values()) == ["done", "done"]
    for folder in statuses:
        assert [(d, t) for f, d, t in seen if f == folder] == [(1, 3), (2, 3), (3, 3)]


def test_the_pool_stops_starting_calls_and_reports_before_each_outcome():
    reports: list[int] = []
    outcomes = []
    calls = [(i,) for i in range(12)]
    for outcome in LocalExecutor(2).map(fail_first, calls, Slot(1, 0, 1),
                                        stop=lambda: any(o.value == "fail" for o in outcomes),
                                        report=lambda index, message: reports.append(index)):
        assert outcome.index in reports, "a call's reports come before its outcome"
        outcomes.append(outcome)
    ran = sorted(o.index for o in outcomes)
    assert 0 in ran and len(ran) < len(calls), ran
    assert sorted(reports) == ran, "the calls cancelled never started"
    assert all(o.value == "ok" for o in outcomes if o.index != 0)


def test_the_in_process_executor_stops_at_once():
    outcomes = list(LocalExecutor(1).map(fail_first, [(i,) for i in range(5)], Slot(1, 0, None),
                                         stop=lambda: True))
    assert outcomes == []
    outcomes = []
    for outcome in LocalExecutor(1).map(fail_first, [(0,), (1,), (2,)], Slot(1, 0, None),
                                        stop=lambda: bool(outcomes)):
        outcomes.append(outcome)
    assert [o.index for o in outcomes] == [0]


def test_statuses_name_the_cells_never_started(tmp_path):
    spec = C.tomllib.loads(SWEEP.format(root=tmp_path / "none"))
    statuses = run_sweep(spec, tmp_path / "runs", progress=False)
    assert list(statuses.values()).count(NOT_STARTED) == 2 and len(statuses) == 3
