"""benchmarks/gpu_proof (python -m benchmarks.gpu_proof): the --tiny run the suite makes (every part, every field a GPU run fills), the
clock each part runs against, and what a killed run leaves."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.gpu_proof import machine, part_pipeline, runner, setup
from benchmarks.gpu_proof.__main__ import main as proof_main

REPO = Path(__file__).resolve().parents[1]
PT_YAML = REPO / "trainer" / "configs" / "ola_vlm_pt.yaml"
MODES = ["LLaVA-1.5 PT (projector, NTP)", "OLA-VLM PT", "VLoRA PT", "VLoRA + OLA-VLM losses"]


def proof_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_proof", "--tiny", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_proof(tmp_path_factory, ray_head):
    """The --tiny run, its Ray job on the session's loopback head (as on a user's cluster: --ray-address). Its time
    is ten hours, so no part's share runs out however loaded the machine (the budget is tested with a fake clock
    below); the subprocess timeout only stops a hung run."""
    out = tmp_path_factory.mktemp("proof")
    p = subprocess.run(proof_cmd(out, "--minutes", "600", "--ray-address", ray_head), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "gpu_proof.json").read_text()), p.stdout


@pytest.mark.slow
def test_tiny_run_finishes_every_part_and_records_the_environment(tiny_proof):
    data, stdout = tiny_proof
    assert data["schema"] == "olaf-gpu-proof/1" and data["mode"] == "tiny"
    assert data["finished"] and data["interrupted"] is None
    failed = {n: p.get("error") or p.get("stopped_before") for n, p in data["parts"].items() if p["status"] != "done"}
    assert not failed
    assert list(data["parts"]) == ["teachers", "recipes", "pipeline", "pt", "probe"]
    env = data["env"]
    assert env["torch"] == torch.__version__ and env["gpu"] is None and env["device"] == "cpu"
    for lib in ("transformers", "ray", "zarr", "webdataset", "numcodecs", "safetensors"):
        assert env["libraries"][lib] == version(lib), lib
    assert env["libraries"]["pillow"] == version("pillow")
    assert len(env["code"]["source_sha256"]) == 64
    assert "olaf GPU proof (tiny)" in stdout and "written:" in stdout
    for name in data["parts"]:  # the table has a line of figures for every part, not its error
        line = next(x for x in stdout.splitlines() if x.startswith(name + " "))
        assert " done " in line and ("img/s" in line or "ms/" in line), line


@pytest.mark.slow
def test_teacher_figures(tiny_proof):
    from recipes.manifest import load_manifest

    t = tiny_proof[0]["parts"]["teachers"]
    manifest = load_manifest()
    assert t["dtypes"] == {"gen": "float32", "depth": "float32", "seg": "float32"}  # CPUs run float32
    for task, row in t["per_teacher"].items():
        assert row["input"] == list(manifest.teachers[task].preprocess.input_size)
        assert row["output"][0] == manifest.teachers[task].output_shape[0]  # tokens; the tiny width differs
        assert [r["batch"] for r in row["sweep"]] == [1, 2]
        for r in row["sweep"]:
            assert r["img_s"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None  # no peak on a CPU
            assert r["tflops"] == pytest.approx(r["img_s"] * row["gflop_per_image"] / 1e3, rel=0.02, abs=2e-3)
        assert row["best_batch"] == max(row["sweep"], key=lambda r: r["img_s"])["batch"]
        assert row["eager_attention"]["applies"] and row["eager_attention"]["img_s"] > 0
        assert row["channels_last"]["img_s"] > 0
    assert t["per_teacher"]["gen"]["compile"]["backend"] == "eager"  # --tiny: dynamo's trace, no compiler
    assert "compile" not in t["per_teacher"]["seg"]
    three = t["all_three"]
    assert three["batch"] == min(r["best_batch"] for r in t["per_teacher"].values())
    assert three["gflop_per_image"] == pytest.approx(sum(r["gflop_per_image"] for r in t["per_teacher"].values()),
                                                     abs=2e-3)
    loop = t["original_loop"]
    assert loop["images"] == 2 and loop["batched_vs_original"] == pytest.approx(three["img_s"] / loop["img_s"], rel=0.02, abs=0.01)


@pytest.mark.slow
def test_recipe_and_pipeline_figures(tiny_proof, ray_head):
    parts = tiny_proof[0]["parts"]
    r = parts["recipes"]["recipes"]
    assert r["all_bit_identical"] is True and r["self_check_failed"] == []
    assert {t: x["bit_identical"] for t, x in r["per_task"].items()} == {"gen": 4, "depth": 4, "seg": 4}
    assert r["pillow"] == version("pillow")
    job = parts["pipeline"]["job"]
    assert job["returncode"] == 0 and not job["timed_out"]
    assert job["progress"]["samples_done"] == parts["pipeline"]["images"] == 12
    assert parts["pipeline"]["command"].endswith(f"--address {ray_head}")  # the job ran on the cluster given
    assert job["img_s"] > 0 and 0 < job["actor_busy"] <= 1
    assert job["decode_cores"] == pytest.approx(job["img_s"] * job["decode_cpu_ms_per_sample"] / 1e3, abs=0.01)
    assert job["node_cores_busy"]["per_second"] and all(0 <= c <= os.cpu_count() + 0.5
                                                        for c in job["node_cores_busy"]["per_second"])


@pytest.mark.slow
def test_pt_and_probe_figures(tiny_proof):
    parts = tiny_proof[0]["parts"]
    pt = parts["pt"]
    assert list(pt["modes"]) == MODES
    fsdp, whole = pt["vlora_fsdp"], pt["modes"]["VLoRA PT"]
    assert fsdp["sharding"] == "fsdp" and fsdp["ms_per_sample"] > 0  # the fsdp code path ran a step
    assert fsdp["trained_params"] == whole["trained_params"] and fsdp["trained_state_bytes"] > 0
    rows = pt["modes"]
    task_tokens = sum(yaml.safe_load(PT_YAML.read_text())["tasks"]["task_tokens"].values())
    # OLA-VLM's sequence is LLaVA's plus its task tokens; VLoRA's has no image tokens (24 x 24 patches)
    assert rows["OLA-VLM PT"]["llm_tokens"] == rows["LLaVA-1.5 PT (projector, NTP)"]["llm_tokens"] + task_tokens
    assert rows["VLoRA PT"]["llm_tokens"] < rows["LLaVA-1.5 PT (projector, NTP)"]["llm_tokens"] - 576 + 8
    assert rows["VLoRA + OLA-VLM losses"]["llm_tokens"] == rows["VLoRA PT"]["llm_tokens"] + task_tokens
    assert rows["OLA-VLM PT"]["gradient_checkpointing"] is True
    assert all(r["ms_per_sample"] > 0 and r["trained_params"] > 0 for r in rows.values())
    ola = rows["OLA-VLM PT"]["ms_per_sample"]
    assert pt["task_tokens_and_heads_share"] == pytest.approx(1 - rows[MODES[0]]["ms_per_sample"] / ola, abs=2e-3)
    inline = pt["teachers_in_step"]
    assert inline["stored_vs_in_step"] == pytest.approx(inline["ms_per_sample"] / ola, abs=0.01)
    assert inline["trained_params"] == rows["OLA-VLM PT"]["trained_params"]  # the same model, targets from elsewhere
    feed = pt["loader"]
    assert feed["samples"] == 16 and feed["samples_per_s"] > 0
    assert feed["step_consumes_per_s"] == pytest.approx(1e3 / ola, rel=0.01)
    assert feed["headroom"] == pytest.approx(feed["samples_per_s"] / feed["step_consumes_per_s"], rel=0.02, abs=0.01)
    probe = parts["probe"]
    one = probe["designs"]["olaf: one pass, every task"]
    jobs = [r for k, r in probe["designs"].items() if k.startswith("authors")]
    layers = 20  # vlora_step's tiny LLM
    assert one["probes"] == 3 * layers and [r["probes"] for r in jobs] == [layers] * 3
    assert one["mllm_forwards_per_step"] == 1 and all(r["mllm_forwards_per_step"] == 1 for r in jobs)
    assert one["probe_params"] == sum(r["probe_params"] for r in jobs)  # the same probes, in one pass or three
    assert probe["one_pass_vs_jobs"] == pytest.approx(sum(r["ms_per_sample"] for r in jobs) / one["ms_per_sample"],
                                                      rel=0.01, abs=0.01)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_each_part_gets_its_share_stops_when_over_and_the_record_is_on_disk_as_it_goes(tmp_path):
    clock = FakeClock()
    path = tmp_path / "gpu_proof.json"
    proof = runner.Proof(path, minutes=2, mode="tiny", clock=clock, hard_stop=False)
    seen = {}

    def slow(pr):
        pr.put("first", 1)
        seen["on_disk"] = json.loads(path.read_text())["parts"]["slow"]["first"]
        clock.now += 1000  # far past its share
        pr.check("the second figure")
        pr.put("second", 2)

    def broken(pr):
        pr.put("before", 1)
        raise ValueError("no such thing")

    def quick(pr):
        clock.now += 1
        pr.put("value", 3)

    proof.run({"slow": slow, "broken": broken, "quick": quick}, {"slow": 0.5, "broken": 0.25, "quick": 0.25})
    parts = json.loads(path.read_text())["parts"]
    assert seen["on_disk"] == 1
    assert parts["slow"]["status"] == "budget" and parts["slow"]["stopped_before"] == "the second figure"
    assert "second" not in parts["slow"] and parts["slow"]["budget_s"] == pytest.approx((120 - 10) * 0.5, abs=0.1)
    assert parts["slow"]["seconds"] == 1000
    # the next parts share what is left: nothing, after the first overran the whole run
    assert parts["broken"]["status"] == "error" and "no such thing" in parts["broken"]["error"]
    assert parts["broken"]["before"] == 1 and parts["broken"]["budget_s"] == 0
    assert parts["quick"]["status"] == "done" and parts["quick"]["value"] == 3


def test_time_left_by_an_early_part_goes_to_the_next(tmp_path):
    clock = FakeClock()
    proof = runner.Proof(tmp_path / "p.json", minutes=1, mode="tiny", clock=clock, hard_stop=False)

    def early(pr):
        clock.now += 5

    proof.run({"a": early, "b": early}, {"a": 0.5, "b": 0.5})
    parts = proof.data["parts"]
    assert parts["a"]["budget_s"] == pytest.approx(25.0)  # (60 - 10) / 2
    assert parts["b"]["budget_s"] == pytest.approx(45.0)  # all that is left: 60 - 10 - 5


def test_the_alarm_stops_a_figure_that_hangs(tmp_path):
    proof = runner.Proof(tmp_path / "p.json", minutes=0, mode="tiny")
    proof.grace = lambda budget: 0.3  # the alarm rings 0.3 s after the part starts
    ticks = []

    def hangs(pr):
        while len(ticks) < 1000:  # would take 50 s
            ticks.append(1)
            time.sleep(0.05)

    proof.run_part("hangs", hangs, 0.0)
    part = proof.data["parts"]["hangs"]
    assert part["status"] == "budget" and "alarm" in part["stopped_before"]
    assert len(ticks) < 1000


@pytest.mark.slow
def test_a_killed_run_leaves_what_it_measured(tmp_path):
    p = subprocess.Popen(proof_cmd(tmp_path, "--parts", "teachers,recipes"), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    path = tmp_path / "gpu_proof.json"
    deadline = time.monotonic() + 300
    measured = None
    while time.monotonic() < deadline and p.poll() is None:
        try:
            measured = json.loads(path.read_text())["parts"]["teachers"]["per_teacher"]["gen"]["sweep"]
        except (OSError, KeyError, ValueError):
            time.sleep(0.1)
            continue
        break
    assert measured, "no figure appeared"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out
    data = json.loads(path.read_text())
    assert data["interrupted"] == "SIGTERM during teachers"
    assert data["parts"]["teachers"]["per_teacher"]["gen"]["sweep"][:len(measured)] == measured
    assert data["finished"] is None


def test_unknown_part_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        proof_main(["--out", str(tmp_path / "x"), "--parts", "teachers,warp"])
    assert stop.value.code == 2 and "unknown warp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was made


def test_figures_already_measured_are_never_replaced_and_no_budget_is_refused(tmp_path, capsys):
    """On a lease gpu_proof.json may be the only copy of measured figures: a second run writes beside it. A file as
    --out, and a time of zero or less (which measured nothing and said OK), are refused in one line."""
    out = tmp_path / "proof"
    out.mkdir()
    (out / "gpu_proof.json").write_text('{"measured": "on an H100"}')
    assert proof_main(["--out", str(out), "--tiny", "--parts", "recipes", "--minutes", "2"]) == 0
    assert (out / "gpu_proof.json").read_text() == '{"measured": "on an H100"}'
    new = [p for p in out.iterdir() if p.name != "gpu_proof.json"]
    assert len(new) == 1 and new[0].name.startswith("gpu_proof-")
    assert json.loads(new[0].read_text())["parts"]["recipes"]["status"] == "done"
    assert "is kept; this run writes" in capsys.readouterr().out
    (tmp_path / "afile").write_text("mine")
    for argv, said in ((["--out", str(tmp_path / "afile")], "is a file"), (["--out", str(out), "--minutes", "0"],
                       "positive"), (["--out", str(out), "--minutes", "-1"], "positive"),
                       (["--out", str(out), "--minutes", "nan"], "positive")):
        with pytest.raises(SystemExit) as stop:
            proof_main(argv + ["--tiny"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and said in err and "Traceback" not in err, argv
    assert (tmp_path / "afile").read_text() == "mine" and len(list(out.iterdir())) == 2


def test_a_library_that_is_not_installed_is_recorded_as_null(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "LIBRARIES", ("transformers", "no-such-library-olaf"))
    s = setup.make_setup(argparse.Namespace(tiny=True, peak_tflops=None, compile_backend=None, job_images=0, ray_address=None), tmp_path)
    libs = machine.environment(s)["libraries"]
    assert libs["no-such-library-olaf"] is None and libs["transformers"] == version("transformers")


def test_a_job_past_its_time_is_stopped_with_sigterm_then_sigkill():
    # a job that finishes what it is doing on SIGTERM, and one that ignores it
    polite = [sys.executable, "-c", "import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('committed'), sys.exit(3)))\ntime.sleep(120)"]
    deaf = [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('started', flush=True)\ntime.sleep(120)"]
    done, _ = part_pipeline.run_job(polite, timeout=2.0)  # the child has set its handler long before
    assert done["timed_out"] and done["returncode"] == 3 and "committed" in done["tail"]
    done, cores = part_pipeline.run_job(deaf, timeout=2.0, grace_s=0.5)
    assert done["timed_out"] and done["returncode"] == -signal.SIGKILL and "started" in done["tail"]
    assert isinstance(cores["per_second"], list)


def test_a_job_is_not_left_running_when_its_part_is_stopped(tmp_path):
    pid_file, slept = tmp_path / "pid", tmp_path / "slept"
    job = [sys.executable, "-c", "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(20)\nopen({str(slept)!r}, 'w')"]
    proof = runner.Proof(tmp_path / "p.json", minutes=0, mode="tiny")
    proof.grace = lambda budget: 3.0  # the alarm comes while the job still has 100 s to go

    proof.run_part("pipeline", lambda pr: part_pipeline.run_job(job, timeout=100.0), 0.0)
    assert proof.data["parts"]["pipeline"]["status"] == "budget"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    assert not slept.exists()  # killed: the part did not wait for the job to end by itself
