"""`sweep status` and `sweep report` on stores holding trials in every state.

The stores are built through the real Experiment API (tests/test_report_support.py); the numbers
the report shows are checked against the result files in the store, not against the report's
own reading of them.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest
from rich.console import Console
from test_report_support import build_mixed_sweep, stored_results

from sweep.report import SweepView, Timing, load_view, print_status, watch_status, write_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One mid-flight sweep shared by this module's tests (they only read it)."""
    exp, exp_store = build_mixed_sweep(tmp_path_factory.mktemp("mixed") / "store")
    return exp, exp_store


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _refs(html_text: str) -> _Refs:
    parser = _Refs()
    parser.feed(html_text)
    return parser


def test_report_files_rows_and_best_match_the_store(mixed, tmp_path):
    exp, exp_store = mixed
    out = write_report(exp, tmp_path / "rep", ax=False)
    rep = tmp_path / "rep"
    for name in (
        "report.html",
        "trials.csv",
        "trials.json",
        "best.json",
        "best_so_far.png",
        "loss_vs_parameters.png",
        "curves_stage1_9.png",
        "curves_stage2.png",
    ):
        assert (rep / name).is_file(), name
    for png in rep.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    rows = list(csv.DictReader((rep / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == list(range(7))  # one row per trial created
    assert {int(r["trial"]): r["state"] for r in rows} == {
        0: "completed",
        1: "completed",
        2: "completed",
        3: "failed",
        4: "running",
        5: "queued",
        6: "early_stopped",
    }
    by_trial = {int(r["trial"]): r for r in rows}
    assert by_trial[3]["reason"] == "bad config: stage2.optimizer.lr must be > 0"
    assert by_trial[4]["attempts"] == "2" and by_trial[4]["attempt_outcomes"] == "1:preempted"
    assert by_trial[5]["reason"] == "spot instance reclaimed"
    assert by_trial[6]["metric.stopped_at_step"] == "5"
    assert by_trial[0]["first_claimed_at"] and by_trial[0]["ended_at"] and float(by_trial[0]["wall_s"]) >= 0
    assert float(by_trial[0]["run_s"]) == 12.5
    # Parameters: log-scale floats, the bool, and the conditional child only where active.
    for r in rows:
        assert 1e-3 <= float(r["param.stage1_9_lr"]) <= 8e-3
        assert (r["param.initial_k"] != "") == (r["param.saliency"] == "true")

    results = stored_results(exp_store)
    completed = {
        i: res["metrics"]["final_eval_loss"] for i, res in results.items() if res["status"] == "completed"
    }
    best_index = min(completed, key=completed.get)
    best = json.loads((rep / "best.json").read_text())
    assert best["trial"] == best_index == out.best["trial"]
    assert best["loss"] == completed[best_index] == 2.5
    assert best["params"] == {
        k: v for k, v in json.loads(exp_store.read(f"trials/{best_index}/claim.json")[0])["params"].items()
    }
    assert best["command"].startswith(
        "python -m sweep.testing.synthetic_trial --out result.json -- function=mixed"
    )
    assert f"stage1_9_lr={best['params']['stage1_9_lr']!r}" in best["command"]

    records = json.loads((rep / "trials.json").read_text())
    assert len(records) == 7
    assert records[4]["attempt_results"][0]["status"] == "preempted"
    assert records[4]["history"][0]["outcome"] == "SIGTERM at stage1_9 step 4"


def test_html_is_self_contained(mixed, tmp_path):
    exp, _ = mixed
    write_report(exp, tmp_path, ax=False)
    page = (tmp_path / "report.html").read_text()
    parsed = _refs(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags  # no scripts, no external CSS
    assert parsed.refs, "the page should reference its plots and data files"
    for ref in parsed.refs:
        url = urlparse(ref)
        assert not url.scheme and not url.netloc and not ref.startswith("/"), ref
        assert (tmp_path / ref).is_file(), ref
    imgs = [r for r in parsed.refs if r.endswith(".png")]
    assert set(imgs) == {
        "best_so_far.png",
        "loss_vs_parameters.png",
        "curves_stage1_9.png",
        "curves_stage2.png",
    }
    assert "not computed (sweep report --no-ax)" in page
    # Trials best first: the completed ones by loss, failed last.
    order = [page.index(f'<td class="num">{i}</td>') for i in (1, 2, 0, 6, 4, 5, 3)]
    assert order == sorted(order)


def test_status_header_counts_best_rate_and_time_left(mixed):
    exp, _ = mixed
    buf = io.StringIO()
    view = print_status(exp, Console(file=buf, width=220, color_system=None))
    text = buf.getvalue()
    for piece in (
        "trials 7/8",
        "running 1",
        "queued 1",
        "completed 3",
        "early-stopped 1",
        "failed 1",
        "best so far: trial 1 (Sobol) final_eval_loss 2.5000 ± 0.0100",
        "trials/h",
        "left",
        "stage2:3",
        "3.1000",
        "spot instance reclaimed",
    ):
        assert piece in text, piece
    assert view.n_ended == 5
    assert view.per_hour == pytest.approx(5 / (view.elapsed_s / 3600))
    assert view.eta_s == pytest.approx((8 - 5) / view.per_hour * 3600)


def test_watch_redraws_until_told_to_stop(mixed):
    exp, _ = mixed
    buf = io.StringIO()
    view = watch_status(exp, Console(file=buf, width=200, color_system=None), interval_s=0.01, max_updates=2)
    assert not view.status.finished
    assert "best so far: trial 1" in buf.getvalue()


def test_view_arithmetic_on_a_finished_sweep():
    class _Status:
        finished, budget = True, 2
        rows = (type("R", (), {"state": "completed"})(), type("R", (), {"state": "failed"})())

    view = SweepView(
        status=_Status(), now=10_000.0, timings={0: Timing(1000.0, 1600.0), 1: Timing(1100.0, 2800.0)}
    )
    assert view.started_at == 1000.0 and view.ended_at == 2800.0
    assert view.elapsed_s == 1800.0  # the last trial's end, not now: a finished sweep's clock stops
    assert view.per_hour == pytest.approx(4.0)
    assert view.eta_s == 0.0
    assert view.timings[1].wall_s == 1700.0


def test_report_cli_notes_the_ax_analyses_it_cannot_compute(mixed, tmp_path):
    """Sobol-only sweep: no fitted model yet, so each Ax plot becomes a one-line note."""
    _, exp_store = mixed
    run = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "report", "--store", exp_store.uri, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best configuration: trial 1 (Sobol), final_eval_loss = 2.5000 ± 0.0100" in run.stdout
    assert "reproduce: python -m sweep.testing.synthetic_trial" in run.stdout
    page = (tmp_path / "report.html").read_text()
    for title in ("Parameter sensitivity (Ax)", "Model fit: predicted vs observed (Ax cross-validation)"):
        assert f"<b>{title}</b>: skipped" in page.replace("&amp;", "&")
        note = page.split(f"<b>{title}</b>: skipped &mdash; ", 1)[1].split("</div>", 1)[0]
        assert "\n" not in note and len(note) < 400 and "model" in note.lower()
        assert f"skipped {title}" in run.stdout.replace("\n", " ")
    assert not (tmp_path / "ax_sensitivity.png").exists()


def test_report_cli_names_a_missing_store(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "report", "--store", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no store at" in run.stderr


def test_loss_of_a_row_without_objective_is_blank_not_nan(mixed, tmp_path):
    exp, _ = mixed
    view = load_view(exp)
    failed = next(r for r in view.status.rows if r.state == "failed")
    assert failed.loss is None
    write_report(exp, tmp_path, ax=False)
    row = next(r for r in csv.DictReader((tmp_path / "trials.csv").open()) if r["state"] == "failed")
    assert row["final_eval_loss"] == "" and row["final_eval_loss_sem"] == ""


def test_status_imports_neither_ax_nor_torch_nor_matplotlib(mixed):
    _, exp_store = mixed
    code = (
        "import sys; from sweep.cli import main; rc = main(['status', '--store', sys.argv[1]]); "
        "heavy = sorted(m for m in ('ax', 'torch', 'matplotlib', 'botorch') if m in sys.modules); "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, exp_store.uri], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "HEAVY []" in run.stdout
    assert "completed 3" in run.stdout
