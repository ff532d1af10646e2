"""A transport that hands each instruction straight to an in-process ``EditWorker``.

The same worker steps as a ClientApp runs (``EditWorker.handle``), without Flower: what the fast
tests and the reproduction benchmark use. Every instruction and reply is kept in ``log`` when asked.
"""

from __future__ import annotations

from fededit_core.client.worker import ClientSpec, EditWorker
from strategies.session import Instruction, Reply


class InProcessTransport:
    def __init__(self, specs: dict[str, ClientSpec], worker: EditWorker | None = None, keep_log: bool = True):
        self.specs, self.worker, self.keep_log = specs, worker or EditWorker(), keep_log
        self.log: list[tuple[str, Instruction, Reply]] = []

    def __call__(self, instructions: dict[str, Instruction]) -> dict[str, Reply]:
        replies = {}
        for client, ins in instructions.items():
            try:
                body, arrays = self.worker.handle(ins.op, self.specs[client], ins.args, ins.arrays)
                replies[client] = Reply(client, body, arrays)
            except Exception as err:  # noqa: BLE001 - as the ClientApp does: the failure goes back as the reply
                replies[client] = Reply(client, error=f"{type(err).__name__}: {err}")
            if self.keep_log:
                self.log.append((client, ins, replies[client]))
        return replies
