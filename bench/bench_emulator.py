"""Benchmark: a 100,000-request batch through the emulator over real loopback HTTP.

The emulator runs in a child process (so each side's peak RSS is its own); this process
creates the batch with the official SDK (~600-character prompts), waits for it to end and
streams the results back, then prints per phase the wall time and the emulator's own CPU
time (what the emulator spent, apart from the SDK's encoding and decoding in this process),
and peak RSS of both sides.

    .venv/bin/python bench/bench_emulator.py [--requests 100000] [--prompt-chars 600]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time

import anthropic
import httpx2
import psutil

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "count",
    "stars",
]


def prompt(rng: random.Random, chars: int) -> str:
    """Filler text of about ``chars`` characters, different for each request."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


class PeakRss:
    """Samples a process's RSS in a thread and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--prompt-chars", type=int, default=600)
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "batchpipe", "emulator", "--port", "0", "--processing-seconds", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    url = server.stdout.readline().strip()
    server_rss = PeakRss(server.pid)
    emulator = psutil.Process(server.pid)

    def emulator_cpu() -> float:
        times = emulator.cpu_times()
        return float(times.user + times.system)

    client_rss = PeakRss(os.getpid())
    try:
        rng = random.Random(0)
        t0 = time.perf_counter()
        requests = [
            {
                "custom_id": f"bench-{i}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 32,
                    "messages": [{"role": "user", "content": prompt(rng, args.prompt_chars)}],
                },
            }
            for i in range(args.requests)
        ]
        t1 = time.perf_counter()
        c1 = emulator_cpu()
        client = anthropic.Anthropic(api_key="bench", base_url=url, max_retries=0, timeout=600)
        batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        c2 = emulator_cpu()
        del requests
        ended = client.messages.batches.retrieve(batch.id)  # ends (and is answered) here
        t3 = time.perf_counter()
        c3 = emulator_cpu()
        lines = succeeded = 0
        for line in client.messages.batches.results(batch.id):
            lines += 1
            succeeded += line.result.type == "succeeded"
        t4 = time.perf_counter()
        c4 = emulator_cpu()
        stats = httpx2.get(f"{url}/_emulator/stats").json()
    finally:
        server_peak = server_rss.stop()
        client_peak = client_rss.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    mib = 1024 * 1024
    print(f"requests            {args.requests} x ~{args.prompt_chars}-char prompts")
    print(f"{'phase':19} {'wall':>9} {'emulator CPU':>14}")
    print(f"build requests      {t1 - t0:7.2f} s")
    print(f"create (SDK, HTTP)  {t2 - t1:7.2f} s {c2 - c1:11.2f} s")
    print(
        f"end batch (answer)  {t3 - t2:7.2f} s {c3 - c2:11.2f} s   status={ended.processing_status}"
    )
    print(f"stream results      {t4 - t3:7.2f} s {c4 - c3:11.2f} s   lines={lines} ok={succeeded}")
    print(f"total               {t4 - t0:7.2f} s")
    print(f"peak RSS client     {client_peak / mib:7.0f} MiB")
    print(f"peak RSS emulator   {server_peak / mib:7.0f} MiB")
    print(f"emulator stats      duplicate_successes={stats['duplicate_successes']}")


if __name__ == "__main__":
    main()
