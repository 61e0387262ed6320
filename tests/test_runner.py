"""simulations/runner.py: how the simulation's Ray starts, or joins a running cluster."""

from simulations import runner


def test_joining_a_ray_cluster_passes_its_address_and_none_of_this_machines_resources():
    # Ray refuses num_cpus (and resources) from a driver that joins an existing cluster: the cluster's own count
    joined = runner.ray_init_args(ray_address="127.0.0.1:6379", verbose=False)
    assert joined["address"] == "127.0.0.1:6379" and "num_cpus" not in joined and "resources" not in joined
    local = runner.ray_init_args(ray_address=None, verbose=False)
    assert "address" not in local and local["num_cpus"] >= 1
    assert joined["include_dashboard"] is local["include_dashboard"] is False


class OnePass:
    """f_stop for one pass of a feed loop: not set at the first check, set at the second."""

    def __init__(self):
        self.checks = 0
        self.waits = []

    def is_set(self):
        self.checks += 1
        return self.checks > 1

    def wait(self, timeout):
        self.waits.append(timeout)


def test_the_simulation_feeds_the_same_messages_asking_only_the_nodes_that_have_one(monkeypatch):
    from dataclasses import replace
    from queue import Queue

    import flwr
    from flwr.app import RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord, Task
    from flwr.simulation.run_simulation import FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager, ObjectStoreFactory
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):  # as the ServerApp's thread
        monkeypatch.setattr(TaskIdentity, name, value)

    def federation(nodes, receivers):
        """Flower's in-memory LinkState as the simulation builds it, one train message for each receiver index."""
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        run = replace(Run.create_empty(1), primary_task_id=1, federation_id=NOOP_FEDERATION_ID)
        factory.state().run_ids[1] = RunRecord(run=run)
        factory.state().task_store[1] = Task(task_id=1, run_id=1)
        mapping = vce_api._register_nodes(nodes, factory)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        ids = list(mapping)
        assert len(list(grid.push_messages([grid.create_message(RecordDict(), "train", ids[i], "1") for i in receivers]))) == len(
            receivers
        )
        return factory.state(), mapping

    def feed(function, nodes, receivers):
        state, mapping = federation(nodes, receivers)
        asked, ask = [], state.get_message_ins
        state.get_message_ins = lambda node_id, limit: asked.append(node_id) or ask(node_id=node_id, limit=limit)
        queue, stop = Queue(), OnePass()
        function(state, queue, mapping, stop)
        out = [mapping[queue.get().metadata.dst_node_id] for _ in range(queue.qsize())]
        return out, len(asked), stop.waits

    # Execute: Flower 1.42's feed and fedfuse's, on 300 nodes with 5 messages waiting
    assert flwr.__version__ == runner.PATCHED_FLOWER  # pinned: the replacement copies this version's behaviour
    theirs, theirs_asked, theirs_waits = feed(vce_api.add_messages_to_queue, 300, [250, 3, 120, 7, 299])
    ours, ours_asked, ours_waits = feed(runner.add_messages_to_queue, 300, [250, 3, 120, 7, 299])
    # Assert: the same messages in the same order (node order), for 5 asks instead of 300
    assert ours == theirs == [3, 7, 120, 250, 299]
    assert (theirs_asked, ours_asked) == (300, 5)
    assert feed(runner.add_messages_to_queue, 50, [])[1] == 0  # nothing waiting: nothing asked
    # and the next pass comes after 0.01 s, not 0.1 s: a message phase starts within 10 ms of the push
    assert (theirs_waits, ours_waits) == ([0.1], [runner.FEED_INTERVAL]) and runner.FEED_INTERVAL <= 0.01
