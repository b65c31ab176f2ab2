"""Tests of table.py's headline verdicts (run by `cargo xtask test`; standard library only):
python -m unittest discover -s bench/reference -p 'test_*.py'"""

import unittest

from table import build, peak_alloc


def step(side, seconds, precision="f32", **extra):
    row = {
        "side": side, "model": "m", "what": "step", "steps": 10, "batch": 64, "remat": "per_call",
        "precision": precision, "seconds": seconds, "memory_mib": 7000.0, "memory_kind": "cuda reserved growth",
        "cuda_graphs": False, "channels_last": False, "cudnn_benchmark": False,
    }
    row.update(extra)
    return row


REFERENCE = step("reference", 0.8, cuda_max_allocated_mib=6000.0)


def verdicts(text):
    """The "goal met" cell of each row of the step goal table, by its "ours" cell."""
    lines = text.split("**Goal: a K = 10 step")[1].split("\n\n")[1].splitlines()[2:]
    return {cells[2].strip(): cells[-2].strip() for cells in (line.split("|") for line in lines)}


class PeakAlloc(unittest.TestCase):
    def test_eager_run_is_its_allocator_peak(self):
        self.assertEqual(peak_alloc(REFERENCE), 6000.0)
        self.assertIsNone(peak_alloc(step("ours", 0.4)))

    def test_graph_run_adds_its_pool_to_the_timed_peak(self):
        row = step("ours", 0.4, cuda_graphs=True, cuda_max_allocated_mib=3000.0,
                   cuda_timed_max_allocated_mib=2500.0, cuda_graph_pool_mib=1500.0)
        self.assertEqual(peak_alloc(row), 4000.0)

    def test_capture_peak_counts_when_it_is_larger(self):
        row = step("ours", 0.4, cuda_graphs=True, cuda_max_allocated_mib=5000.0,
                   cuda_timed_max_allocated_mib=2500.0, cuda_graph_pool_mib=1500.0)
        self.assertEqual(peak_alloc(row), 5000.0)


class StepGoal(unittest.TestCase):
    def test_fast_enough_and_within_memory(self):
        ours = step("ours", 0.39, "bf16", cuda_max_allocated_mib=3000.0)
        self.assertEqual(set(verdicts(build([REFERENCE, ours])).values()), {"yes"})

    def test_too_slow(self):
        ours = step("ours", 0.41, "bf16", cuda_max_allocated_mib=3000.0)
        self.assertEqual(set(verdicts(build([REFERENCE, ours])).values()), {"no"})

    def test_the_graph_pool_can_break_the_memory_goal(self):
        # 4500 MiB in tensors fits under the reference's 6000, but not with its 2000 MiB pool.
        ours = step("ours", 0.3, "bf16", cuda_graphs=True, cuda_max_allocated_mib=4500.0,
                    cuda_timed_max_allocated_mib=4500.0, cuda_graph_pool_mib=2000.0)
        text = build([REFERENCE, ours])
        self.assertIn("peak alloc (+ graph pool)", text)
        self.assertIn("| 6500 | 6000 | 1.08 | no |", text)
        self.assertEqual(set(verdicts(text).values()), {"no"})


if __name__ == "__main__":
    unittest.main()


class TapesCheck(unittest.TestCase):
    def test_budget_runs_are_compared_with_the_eager_per_call_step(self):
        eager = step("ours", 0.48, loss=2.0, grad_norms={"u": 4.0})
        taped = step("ours", 0.40, remat="memory:900", feature_chunk=16, loss=2.0 * (1 + 3e-6),
                     grad_norms={"u": 4.0 * (1 - 2e-5)}, cuda_max_allocated_mib=5000.0)
        text = build([REFERENCE, eager, taped])
        self.assertIn("Calls on tapes (budget remat) vs autograd per call (ours): largest relative difference "
                      "of the loss 3.0e-06, of the gradient norms 2.0e-05 over 1 runs.", text)
        self.assertEqual(verdicts(text)["memory-budget remat, 900 MiB + feature chunks of 16"], "yes")
