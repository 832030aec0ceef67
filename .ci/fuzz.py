"""Fuzzing beyond the unit suite (CI runs both; neither is needed to use the proxy).

  python .ci/fuzz.py TARGET SECONDS   coverage-guided, with atheris (a dev tool: CI installs it in
                                      a throwaway venv); TARGET is one of test_proxy.FUZZ_TARGETS
  python3 .ci/fuzz.py http COUNT      stdlib only: COUNT generated chat completions requests
                                      through a real proxy; none may get a 5xx

Each target builds its input through `choose(n)`: here from atheris' data, in the unit suite
from a seeded generator. Anything but the proxy's own errors is a crash, which libFuzzer
saves (crash-* in the working directory); turn each into a case of test_proxy's
test_every_crash_structured_fuzzing_found_is_now_the_proxys_own_error.
"""
import json
import os
import random
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def http(count):
    import test_proxy as tp

    class Run(tp.ProxyTestCase):
        def runTest(self):
            rng, statuses = random.Random(20261204), {}
            for _ in range(count):
                body = json.dumps(tp.fuzzed(rng.randrange, tp.CHAT_SEEDS)).encode()
                resp = self.request("POST", "/v1/chat/completions", body,
                                    {"Content-Type": "application/json"})
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                self.assertLess(resp.status, 500, resp.body[:300])
                if resp.headers["Content-Type"].startswith("text/event-stream"):
                    self.assertTrue(resp.body.endswith(b"data: [DONE]\n\n"), resp.body[-300:])
                else:
                    self.assertIn("error" if resp.status >= 400 else "choices", resp.json())
            print("%d structured chat requests: %s" % (count, json.dumps(statuses, sort_keys=True)))
    result = unittest.TextTestRunner(verbosity=0).run(Run())
    return 0 if result.wasSuccessful() else 1


def coverage_guided(name, seconds):
    import atheris
    with atheris.instrument_imports(include=["gitlab_duo_proxy"]):
        import gitlab_duo_proxy  # noqa: F401 -- instrumented before test_proxy imports it
    import test_proxy
    target = test_proxy.FUZZ_TARGETS[name]

    def one(data):
        provider = atheris.FuzzedDataProvider(data)
        target(lambda n: provider.ConsumeIntInRange(0, n - 1) if n > 1 else 0)
    atheris.Setup([sys.argv[0], "-max_total_time=%d" % seconds, "-print_final_stats=1"], one)
    atheris.Fuzz()


if __name__ == "__main__":
    if sys.argv[1] == "http":
        sys.exit(http(int(sys.argv[2])))
    coverage_guided(sys.argv[1], int(sys.argv[2]))
