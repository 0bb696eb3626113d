"""Notifications (notify=apprise): what a JSON webhook on 127.0.0.1 receives when a run ends or fails and when a
sweep ends; failures to notify only warn; no URL reaches a file of the run."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, fake_job, run_script
from omegaconf import OmegaConf

from headstart.errors import DataError
from headstart.train import notify
from headstart.train.callbacks import RunNotifier
from headstart.train.notify import ENV_VAR, SweepNotifier, send


class Endpoint:
    """A JSON webhook on 127.0.0.1 at an ephemeral port: what apprise's json:// posts, as parsed JSON."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/{path}"


@pytest.fixture
def endpoint():
    pytest.importorskip("apprise")
    served = Endpoint()
    yield served
    served.server.shutdown()
    served.server.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_finished_run_posts_its_metrics_and_run_dir(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(
        json.dumps({"val/loss": 0.25, "test/label/acc": 0.97, "test/label/count": 9})
    )
    RunNotifier([endpoint.url()], "digits", run, "val/loss", "min").finished()
    (got,) = endpoint.received
    assert got["type"] == "success" and got["title"] == "headstart: run digits finished"
    assert str(run.absolute()) in got["message"]
    assert "val/loss = 0.25 (monitored, min)" in got["message"] and "test/label/acc = 0.97" in got["message"]
    assert "count" not in got["message"]


def test_a_failed_run_names_its_error_once(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, endpoint.url("from-env"))
    notifier = RunNotifier.from_config(
        OmegaConf.create(
            {
                "name": "digits",
                "paths": {"output_dir": str(tmp_path)},
                "monitor": {"metric": "val/loss", "mode": "min"},
                "notify": {"urls": [], "jobs": "failed"},
            }
        )
    )
    notifier.failed(DataError("class '7' has no training sample"), where="fit, epoch 3, step 40")
    notifier.failed(RuntimeError("the same failure, seen again by train()"))
    (got,) = endpoint.received
    assert got["path"] == "/from-env" and got["type"] == "failure"
    assert "error: DataError: class '7' has no training sample" in got["message"]
    assert "stopped at: fit, epoch 3, step 40" in got["message"] and str(tmp_path) in got["message"]


def test_a_sweeps_jobs_send_only_failures_by_default():
    finished_job = RunNotifier(["json://unused"], "x", Path("."), "val/loss", "min", in_sweep=True)
    assert (finished_job.send_finished, finished_job.send_failed) == (False, True)
    every_job = RunNotifier(["json://unused"], "x", Path("."), "val/loss", "min", jobs="all", in_sweep=True)
    assert (every_job.send_finished, every_job.send_failed) == (True, True)


def test_the_sweep_message_counts_jobs_failures_and_the_best(endpoint, tmp_path):
    sweep = tmp_path / "multirun" / "digits" / "2024-01-01_00-00-00"
    for job, lr, loss in [("0", 0.1, 0.5), ("1", 0.01, 0.2), ("2", 0.001, None)]:
        metrics = None if loss is None else {"val/loss": loss, "test/label/acc": 0.9}
        fake_job(sweep / job, tmp_path, [f"optimizer.lr={lr}"], metrics)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "notify": {"urls": [endpoint.url()]}})
    SweepNotifier().on_multirun_end(config)
    (got,) = endpoint.received
    assert got["type"] == "failure" and got["title"] == "headstart: sweep digits done, 3 jobs, 1 FAILED"
    assert "3 jobs, 2 finished, 1 failed" in got["message"]
    assert "best job: 1 (val/loss = 0.2, min)" in got["message"] and str(sweep) in got["message"]
    SweepNotifier().on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "notify": None})
    )
    assert len(endpoint.received) == 1  # notify off: nothing


def test_a_bad_url_or_an_unreachable_endpoint_only_warns_without_the_secret(endpoint, caplog):
    caplog.set_level(logging.WARNING)
    urls = ["nonsense://SECRET-A/x", f"json://127.0.0.1:{closed_port()}/SECRET-B", endpoint.url()]
    assert send("t", "b", urls) is False
    assert len(endpoint.received) == 1  # the good URL still got it
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("URL 1 of 3 (nonsense://) is not a URL apprise understands" in w for w in warned)
    assert any("URL 2 of 3 (json://) did not take the message" in w and "Connection" in w for w in warned)
    assert not any("SECRET" in r.getMessage() for r in caplog.records)


def test_without_apprise_one_warning_names_the_fix(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise raises ImportError
    monkeypatch.setattr(notify, "_warned_missing", False)
    caplog.set_level(logging.WARNING)
    assert send("t", "b", ["json://127.0.0.1:9/x"]) is False
    assert send("t", "b", ["json://127.0.0.1:9/x"]) is False
    warned = [r.getMessage() for r in caplog.records if "apprise is not installed" in r.getMessage()]
    assert len(warned) == 1 and "pip install -e .[notify]" in warned[0]


def test_train_py_notifies_and_writes_no_url_into_its_run(endpoint, tmp_path, monkeypatch):
    """One short run with two URLs: one from HEADSTART_NOTIFY_URLS (reachable), one through notify.urls as
    ${oc.env:...} (nothing listens there: a warning, and the run still succeeds). Neither URL's secret appears in
    any file under the output root (config, checkpoints, TensorBoard, ONNX, bundle, logs)."""
    monkeypatch.setenv(ENV_VAR, endpoint.url("TOKEN-ONE"))
    monkeypatch.setenv("HS_TEST_NOTIFY", f"json://127.0.0.1:{closed_port()}/TOKEN-TWO")
    result = run_script(
        [
            "train.py",
            f"paths.root_dir={tmp_path}",
            "notify=apprise",
            "notify.urls=[${oc.env:HS_TEST_NOTIFY}]",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3",
            "data.num_workers=0",
            "cost.latency=false",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    metrics = json.loads((run / "metrics.json").read_text())
    (got,) = endpoint.received
    assert got["path"] == "/TOKEN-ONE" and got["type"] == "success"
    assert str(run.absolute()) in got["message"]
    assert f"val/loss = {metrics['val/loss']:.6g}" in got["message"] and "test/label/acc" in got["message"]
    assert "URL 2 of 2 (json://) did not take the message" in result.stdout + result.stderr
    assert "${oc.env:HS_TEST_NOTIFY}" in (run / ".hydra" / "config.yaml").read_text()  # saved unresolved
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"TOKEN-" in p.read_bytes()]
    assert not leaked


def test_urls_come_from_the_environment_then_the_config(monkeypatch, caplog):
    monkeypatch.setenv(ENV_VAR, "ntfy://a, json://b")
    monkeypatch.delenv("HS_UNSET_VAR", raising=False)
    assert notify.notify_urls(OmegaConf.create({"urls": ["mailto://c"]})) == [
        "ntfy://a",
        "json://b",
        "mailto://c",
    ]
    caplog.set_level(logging.WARNING)
    assert notify.notify_urls(OmegaConf.create({"urls": ["${oc.env:HS_UNSET_VAR}"]})) == [
        "ntfy://a",
        "json://b",
    ]
    assert "notify.urls cannot be resolved" in caplog.text  # a warning, not a failed run
