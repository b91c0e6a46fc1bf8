"""Locust users for `benchmarks/serve_load.py`: each posts A1111 txt2img requests back to back (no think time) to
a loopback sdrt server. Every request's exact latency goes to $LOAD_RAW (JSON) when locust quits: locust's own
percentiles round to 10 ms above 100 ms, too coarse for a 5 ms overhead target.

    locust -f benchmarks/locustfile.py --headless -u 4 -r 4 -t 20s -H http://127.0.0.1:7860
Settings: LOAD_STEPS (20), LOAD_SIZE (64), LOAD_RAW (a path for the raw latencies).
"""

import json
import os
import random
import time

from locust import FastHttpUser, constant, events, task

STEPS = int(os.environ.get("LOAD_STEPS", "20"))
SIZE = int(os.environ.get("LOAD_SIZE", "64"))
RECORDS: list = []  # (end time s, latency ms, ok)
PROMPTS = [f"a {colour} {digit}" for colour in ("red", "green", "blue", "white") for digit in range(10)]


class Txt2ImgUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def txt2img(self):
        body = {"prompt": random.choice(PROMPTS), "steps": STEPS, "width": SIZE, "height": SIZE, "cfg_scale": 7.5,
                "seed": random.randrange(2**31), "sampler_name": "DDIM"}
        with self.client.post("/sdapi/v1/txt2img", json=body, catch_response=True) as response:
            if response.status_code != 200 or not response.json().get("images"):
                response.failure(f"status {response.status_code}")


@events.request.add_listener
def record(request_type, name, response_time, response_length, exception=None, **kw):
    RECORDS.append((time.time(), float(response_time), exception is None))


@events.quitting.add_listener
def dump(environment, **kw):
    path = os.environ.get("LOAD_RAW")
    if path:
        with open(path, "w") as f:
            json.dump(RECORDS, f)
