"""fedfuse ClientApp: wires Flower's train and evaluate messages to the client handlers."""

import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.handlers import handle_evaluate, handle_train
from client.secagg import handle_secure_train, is_secure_message

torch.set_num_threads(1)  # one ClientApp per core; more threads only contend (measured: 10x slower under load)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this site's encoders + the shared head with DP-SGD; reply with the head only."""
    if is_secure_message(msg):  # secagg.enabled: SecAgg+'s four stages, training in the third
        return secaggplus_mod(msg, context, handle_secure_train)
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on this site's held-out split, overall and per modality subset."""
    return handle_evaluate(msg, context)
