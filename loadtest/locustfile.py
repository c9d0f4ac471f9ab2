"""Locust users for din-rank, for those who prefer locust's UI (locust is not a dependency).

    pip install locust
    DIN_LT_REVIEWS=.din/demo/raw/reviews.json.gz DIN_LT_BUNDLE=.din/demo/bundle \
        locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --users 50 --spawn-rate 10

The requests are the ones `din loadtest` sends: the ids and bodies come from `loadtest.sampling`
(the same id sources, the same lognormal candidate count, the same shares of unknown ids). Locust
loads this file by path, so that import resolves through the installed project: run it where din-rank
is pip-installed (`pip install -e .`, as `make install` does), not from a bare checkout.

Locust is closed-loop (each user waits for its answer), so under overload it measures less than the
open-loop `din loadtest`, which keeps sending on schedule. Configuration, all optional, by env vars:
DIN_LT_REVIEWS (user and item ids from a SNAP reviews file), DIN_LT_USERS_FILE / DIN_LT_ITEMS_FILE
(one id per line), DIN_LT_BUNDLE (items from BUNDLE/items.txt), DIN_LT_CANDIDATES (median candidates,
default 100), DIN_LT_CANDIDATES_SIGMA (0.5), DIN_LT_MAX_CANDIDATES (500), DIN_LT_UNKNOWN_USERS (0.05),
DIN_LT_UNKNOWN_ITEMS (0.02), DIN_LT_TOP_K (none), DIN_LT_PACING_S (seconds between a user's requests,
default 1). Host and user count: locust's own --host / --users, or LOCUST_HOST / LOCUST_USERS.
"""

from __future__ import annotations

import itertools
import os
import random
import sys

from locust import HttpUser, constant_pacing, task

from loadtest.sampling import mix_from_env

# Read once per locust process, when locust imports this file and before any user starts: the id
# files are read here and not on the first request, whose time locust would measure.
MIX, _NOTES = mix_from_env(os.environ)
for _note in _NOTES:
    print(f"locustfile: {_note}", file=sys.stderr)
_RNG = random.Random()  # one per process: locust's users are greenlets of one thread
_SEQ = itertools.count()  # unknown user ids: unique within the process


class RankUser(HttpUser):
    wait_time = constant_pacing(float(os.environ.get("DIN_LT_PACING_S", "1")))

    @task
    def rank(self) -> None:
        body = MIX.request(_RNG, f"locust-{os.getpid()}-{next(_SEQ)}")
        self.client.post("/rank", json=body, name="/rank")
