"""`clipscope reproduce` end to end on the embedded digits, at tiny scale."""

import json
import subprocess
import sys

import pytest

from clipscope.reproduce import reproduce


def quiet(_text: str) -> None:
    pass


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    report = reproduce(
        ["digits-cnn"], out, epochs=1, batch_sizes=[128, 256], progress=False, echo=quiet
    )
    return out, report


def test_study_layout_and_report(study):
    out, report = study
    assert report == out / "report.html" and report.is_file()
    meta = json.loads((out / "study.json").read_text())
    runs = meta["tasks"]["digits-cnn"]["runs"]
    plain = [r for r in runs if "optimizer" not in r]
    assert sorted((r["method"], r["batch_size"]) for r in plain) == sorted(
        (m, b) for m in ("igc", "sgd") for b in (128, 256)
    )
    # the AdamW-clip run ([[study.extra]]): at the smallest of the --batch-sizes
    (adamw,) = [r for r in runs if "optimizer" in r]
    assert (adamw["method"], adamw["batch_size"], adamw["optimizer"]) == ("igc", 128, "adamw")
    assert adamw["dir"] == "runs/digits-cnn/igc-adamw-B128"
    for r in runs:
        rows = (out / r["dir"] / "epochs.csv").read_text().splitlines()
        assert len(rows) == 3  # header + epoch 0 + epoch 1
        assert json.loads((out / r["dir"] / "summary.json").read_text())["status"] == "completed"
    cross = json.loads((out / meta["tasks"]["digits-cnn"]["cross_section"]).read_text())
    assert cross["batch_sizes"] == [128, 256, 512]
    assert all(-1 <= c <= 1 for c in cross["c1"])
    assert len(cross["predicted_cos"]) == 3
    assert report.read_text().count("<img") >= 5


def test_per_sample_section_and_findings(study):
    out, report = study
    meta = json.loads((out / "study.json").read_text())["tasks"]["digits-cnn"]
    section = json.loads((out / meta["per_sample"]).read_text())
    assert section["point"] == "igc-B128" and section["m"] == 1536  # every image a component
    assert len(section["norms"]) == len(section["dots"]) == 1536
    found = json.loads((out / "findings.json").read_text())["tasks"]["digits-cnn"]
    share = found["positive_cos_share_b1"]
    assert 0 <= share["share"] <= 1 and share["n"] + share["n_undefined"] == 1536
    assert found["fig1_trend"]["mean_cos_vs_batch_size"]["batch_sizes"] == [128, 256]
    assert found["eta_advice"]["target"] == 0.9 and found["eta_advice"]["eta_max"] > 0
    assert "Findings" in report.read_text()


def test_the_adamw_run_is_answered_under_its_preconditioner(study):
    out, report = study
    found = json.loads((out / "findings.json").read_text())["tasks"]["digits-cnn"]
    item = found["preconditioned"]["runs"]["igc-adamw-B128"]
    assert item["optimizer"] == "adamw" and item["eta"] == 1.0  # the config's [[study.extra]]
    assert len(item["probes"]["rho_p"]) == 2  # x_0 and x_1
    assert item["p_unset"]["shares"][0] == 1.0  # no step before the first probe: P = 1
    assert item["probes"]["rho_p"][0] == pytest.approx(item["probes"]["rho"][0], rel=1e-9)
    assert item["eta_advice"]["eta_max"] > 0 and item["reversed"] in (True, False)
    assert found["preconditioned"]["without_p"] == ["igc-B128", "igc-B256", "sgd-B128", "sgd-B256"]
    assert found["fig1_trend"]["left_out"] == ["igc-adamw-B128"]
    verdict = {t["run"]: t for t in found["theorems"]}["igc-adamw-B128"]
    assert verdict["verdict"] == "not applicable" and verdict["measured"]["probes"] == 2
    text = report.read_text()
    assert "IGC-AdamW B=128" in text and "igc-adamw-B128: η advice under P" in text
    assert (out / "figures" / "digits-cnn-rho_p_profile.png").is_file()
    # the cross-sections stay at the plain IGC run's final point
    assert (
        json.loads((out / "cross_section/digits-cnn-per-sample.json").read_text())["point"]
        == "igc-B128"
    )


def test_theorem_runs_record_converged_lanczos_and_get_a_verdict(study):
    out, _ = study
    runs = json.loads((out / "study.json").read_text())["tasks"]["digits-cnn"]["runs"]
    # the largest batch size of the grid is the theorem run, for each method
    assert {(r["method"], r["batch_size"]) for r in runs if r.get("theorem")} == {
        ("igc", 256),
        ("sgd", 256),
    }
    found = json.loads((out / "findings.json").read_text())["tasks"]["digits-cnn"]["theorems"]
    verdicts = {t["run"]: t for t in found}
    for run in ("igc-B256", "sgd-B256"):
        t = verdicts[run]
        assert t["verdict"] in ("satisfied", "violated"), t
        assert t["lanczos"]["all_converged"] and t["lanczos"]["tol"] == 0.01
        assert t["lanczos"]["iterations_max"] <= t["lanczos"]["max_iter"]
    assert verdicts["igc-B256"]["constants"]["component_estimate"] == "recorded_hessian"
    assert verdicts["igc-B256"]["lanczos"]["component_iterations_max"] >= 1
    assert verdicts["igc-B128"]["verdict"] == "not checked"


def test_resume_keeps_finished_runs_and_refuses_without_it(study):
    out, _ = study
    csv = out / "runs/digits-cnn/igc-B128/epochs.csv"
    before = csv.stat().st_mtime_ns
    reproduce(
        ["digits-cnn"],
        out,
        epochs=1,
        batch_sizes=[128, 256],
        resume=True,
        progress=False,
        echo=quiet,
    )
    assert csv.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--resume"):
        reproduce(["digits-cnn"], out, epochs=1, batch_sizes=[128], progress=False, echo=quiet)


def test_cli_rejects_bad_input_before_running(tmp_path):
    cmd = [sys.executable, "-m", "clipscope", "reproduce", "--task", "cifar10-resnet18", "--out"]
    done = subprocess.run([*cmd, str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--data-dir" in done.stderr
    assert not (tmp_path / "o").exists()
