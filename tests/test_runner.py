"""simulations/runner.py: how the simulation's Ray starts, or joins a running cluster."""

from simulations import runner


def test_joining_a_ray_cluster_passes_its_address_and_none_of_this_machines_resources():
    # Ray refuses num_cpus (and resources) from a driver that joins an existing cluster: the cluster's own count
    joined = runner.ray_init_args(ray_address="127.0.0.1:6379", verbose=False)
    assert joined["address"] == "127.0.0.1:6379" and "num_cpus" not in joined and "resources" not in joined
    local = runner.ray_init_args(ray_address=None, verbose=False)
    assert "address" not in local and local["num_cpus"] >= 1
    assert joined["include_dashboard"] is local["include_dashboard"] is False
