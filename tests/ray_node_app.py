"""fedfuse's ClientApp, recording which Ray node ran each message (for tests/test_ray_cluster.py only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.client_app import app as fedfuse_app

NODES_FILE = "ray-nodes.jsonl"  # in the run's output folder: one line per message


class NodeRecordingApp(ClientApp):
    """Appends (client partition, message type, round, Ray node id) to the run folder, then runs fedfuse's app."""

    def __call__(self, message: Message, context: Context) -> Message:
        line = {
            "partition": int(context.node_config["partition-id"]),
            "type": message.metadata.message_type,
            "round": int(message.content["config"]["server-round"]),
            "node": ray.get_runtime_context().get_node_id(),
        }
        path = Path(str(context.run_config["out-dir"])) / NODES_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # one write per line: no interleaving
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
        return fedfuse_app(message, context)


app = NodeRecordingApp()
