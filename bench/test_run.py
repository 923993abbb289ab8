#!/usr/bin/env python3
"""Unit tests of bench/run's arithmetic and reporting (medians, ratios, verdicts, the docs table).
No root, no CRIU: `python3 bench/test_run.py` (scripts/test runs it)."""

import importlib.machinery
import importlib.util
import os
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
loader = importlib.machinery.SourceFileLoader("bench_run", os.path.join(HERE, "run"))
spec = importlib.util.spec_from_loader("bench_run", loader)
run = importlib.util.module_from_spec(spec)
loader.exec_module(run)


def s(*xs):
    return run.stats(list(xs))


class Stats(unittest.TestCase):
    def test_median_and_spread(self):
        self.assertEqual(s(3.0, 1.0, 2.0), {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3})
        self.assertEqual(s(1.0, 4.0)["median"], 2.5, "an even count takes the mean of the middle two")

    def test_one_outlier_does_not_move_the_median(self):
        self.assertEqual(s(0.1, 0.1, 0.1, 0.1, 9.0)["median"], 0.1)


class Table(unittest.TestCase):
    def out(self, a, b):
        return {"rounds": 7, "cpus": 2, "kernel": "6.18", "criu": "Version: 4.2.1",
                "redis_small": {"holds": "100000 keys", "stasis_stop_start_s": s(*a), "raw_criu_dump_sync_restore_s": s(*b),
                                "ratio": run.statistics.median(a) / run.statistics.median(b)},
                "durable_001024": {"mib": 1024, "stasis_checkpoint_s": s(1.0), "dd_conv_fsync_s": s(1.5), "ratio_dd_over_stasis": 1.5},
                "idle": {"seconds": 60, "rss_kib": 6000, "context_switches": 0}}

    def test_verdicts_follow_the_goals(self):
        rows = run.table(self.out([0.21, 0.20, 0.22], [0.10, 0.10, 0.11]))
        redis, durable, idle = rows
        self.assertIn("A/B **2.100**", redis[3])
        self.assertIn("not met", redis[4])
        self.assertIn("B/A **1.500**", durable[3])
        self.assertEqual(durable[4], ">= 1.0: met")
        self.assertTrue(idle[4].endswith(": met"))
        rows = run.table(self.out([0.108], [0.100]))
        self.assertEqual(rows[0][4], "<= 1.10: met", "8% over raw CRIU is within the goal")
        rows = run.table(self.out([0.112], [0.100]))
        self.assertEqual(rows[0][4], "<= 1.10: **not met**")

    def test_the_silent_client_has_its_row_and_the_same_goal(self):
        out = self.out([0.105], [0.100])
        out["redis_small"].update(stasis_silent_client_start_s=s(0.115), ratio_silent=1.15)
        rows = run.table(out)
        self.assertEqual(len(rows), 4)
        silent = rows[1]
        self.assertIn("silent kill-port client", silent[0])
        self.assertIn("T/B **1.150**", silent[3])
        self.assertEqual(silent[4], "<= 1.10: **not met**")
        self.assertEqual(rows[0][4], "<= 1.10: met", "the stop in words has its own verdict")

    def test_a_gibibyte_of_redis_must_beat_raw_criu(self):
        out = self.out([0.2], [0.1])
        out["redis_big"] = {"holds": "1024 MiB", "stasis_stop_start_s": s(1.8), "raw_criu_dump_sync_restore_s": s(2.0),
                            "ratio": 0.9}
        big = [r for r in run.table(out) if r[0].startswith("redis holding 1024 MiB")]
        self.assertEqual(len(big), 1)
        self.assertEqual(big[0][4], "<= 0.90: met")
        out["redis_big"]["ratio"] = 0.95
        big = [r for r in run.table(out) if r[0].startswith("redis holding 1024 MiB")]
        self.assertEqual(big[0][4], "<= 0.90: **not met**")

    def test_raw_criu_is_shown_beside_the_durable_row(self):
        out = self.out([0.2], [0.1])
        out["durable_001024"].update(raw_criu_dump_sync_s=s(0.9), ratio_raw_criu_over_stasis=0.9)
        rows = run.table(out)
        self.assertEqual(len(rows), 4)
        self.assertIn("C/A **0.900**", rows[2][3])
        self.assertEqual(rows[2][4], "(reference)")

    def test_docs_are_written_between_the_markers_only(self):
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(f"{d}/docs")
            path = f"{d}/docs/performance.md"
            with open(path, "w") as f:
                f.write("before\n<!-- bench/run: begin -->\nOLD-TABLE\n<!-- bench/run: end -->\nafter\n")
            saved, run.REPO = run.REPO, d
            try:
                out = self.out([0.2], [0.1])
                run.write_docs(out, run.table(out), ["--rounds", "7"])
            finally:
                run.REPO = saved
            with open(path) as f:
                text = f.read()
            self.assertTrue(text.startswith("before\n<!-- bench/run: begin -->\nWritten by `sudo bench/run --rounds 7`"))
            self.assertTrue(text.endswith("<!-- bench/run: end -->\nafter\n"))
            self.assertNotIn("OLD-TABLE", text)
            self.assertIn("| what | A | B | ratio | goal |", text)


if __name__ == "__main__":
    unittest.main()
