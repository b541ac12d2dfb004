"""ClientApp: answer every train message with the same P fp32 values (no compute).

Started by a SuperNode; see benchmarks/flower_deploy.py for how to run it.
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with P ones in T arrays: the cost measured is Flower's, not training's."""
    params = int(context.run_config["params"])
    tensors = int(context.run_config["tensors"])
    arrays = np.array_split(np.ones(params, dtype=np.float32), tensors)
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})}
    )
    return Message(content=content, reply_to=msg)
