"""Load tests for the ranking service, kept outside the server package (`service/`).

- `loadtest.sampling`: the request mix (user / item id sources, the payloads), shared by the
  open-loop generator and the Locust file.
- `loadtest.metrics`: the server's own view, read from its Prometheus `/metrics` before and after.
- `loadtest.report`: what a constant-rate step measured, and how it is shown (table, plot).
- `loadtest.openloop`: the open-loop runner, the find-max search and the `din loadtest` command.
- `locustfile.py`: the same mix for Locust (not a dependency; run it with `locust -f`).
"""
