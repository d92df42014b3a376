"""The load benchmark in a reduced, bounded form: the real app over HTTP with a tiny model
(the run's shared ``app_server``).

``benchmarks/load.py`` launches ``app.py`` and drives ``/classify`` from concurrent
gradio_client clients, then fine-tunes through ``/fine_tune`` while classifying goes on.
"""

import load  # benchmarks/load.py (conftest puts benchmarks/ on the path)


def test_concurrent_clients_all_answered_memory_flat_and_classify_goes_on_while_training(app_server, tmp_path):
    # No deadline: every request is sent and must be answered, however fast this machine is today
    # (speed is measured by benchmarks/load.py itself, as ratios, not asserted here).
    result = load.run_on(app_server, tmp_path, clients=4, calls_per_client=5, requests=120, train=True,
                      timeout=float("inf"), top_k=3)
    burst, memory, training = result["burst"], result["memory"], result["training"]
    assert burst["requests"] == 20 and burst["success_rate"] == 1.0, burst["errors"]
    assert memory["requests"] >= 120 and memory["success_rate"] == 1.0
    assert memory["rss_growth_mb"] <= load.RSS_GROWTH_TARGET_MB
    assert memory["work_files_added"] == 0  # no CSV, upload or model left behind by /classify
    assert training["ok"], training["status"]
    during = training["classify_during"]
    assert during["requests"] >= 1 and during["success_rate"] == 1.0
