"""Credentials given to the download stage (cookies file, proxy) never reach the run dir or the logs."""
from __future__ import annotations

from conftest import run_cli

from pipeline.cli import redacted


def test_redacted_masks_secrets_only():
    cfg = {"stage": {"cookies_file": "/home/me/cookies.txt", "proxy": "http://user:pw@proxy:3128", "retries": 3,
                     "nested": {"api_token": "abc"}}, "run_dir": "/r", "proxy": None}
    out = redacted(cfg)
    assert out["stage"]["cookies_file"] == "***" and out["stage"]["proxy"] == "***"
    assert out["stage"]["nested"]["api_token"] == "***"
    assert out["stage"]["retries"] == 3 and out["run_dir"] == "/r" and out["proxy"] is None


def test_proxy_and_cookies_not_written(tmp_path, shared_media):
    m = tmp_path / "m.txt"
    m.write_text(f"counter {shared_media / 'counter.mp4'}\n")
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n")
    run = tmp_path / "run"
    secret = "http://someuser:s3cr3tpass@127.0.0.1:9"
    run_cli("stage=download", f"run_dir={run}", f"input={m}", f"stage.proxy={secret}",
            f"stage.cookies_file={cookies}")
    for p in run.rglob("*"):
        if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".txt", ""):
            text = p.read_text(errors="ignore")
            assert "s3cr3tpass" not in text and str(cookies) not in text, p
    assert "***" in (run / "download" / "config.yaml").read_text()
