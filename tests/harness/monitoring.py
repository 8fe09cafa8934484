"""A real node_exporter (Debian's prometheus-node-exporter) serving only its textfile collector,
on a loopback port the test owns, stopped by its pid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request

from harness.pg import free_port

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def scrape_textfiles(directory: str, address: str = "127.0.0.1", timeout: float = 20) -> str:
    """Start node_exporter on directory, scrape /metrics once it answers, stop it; the exposition text."""
    port = free_port(address)
    proc = subprocess.Popen(
        [
            NODE_EXPORTER,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={directory}",
            f"--web.listen-address={address}:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Loopback only, whatever proxy the environment names.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with opener.open(f"http://{address}:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"node_exporter did not answer: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
        proc.stderr.close()


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict:
    """Exposition text to {series: value}, comments left out; labels in name order (an exporter may reorder them)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            if "{" in series:
                name, labels = series.split("{", 1)
                series = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(LABEL.findall(labels))) + "}"
            out[series] = float(value)
    return out
