"""A transport that hands each instruction straight to an in-process ``EditWorker``.

The same worker steps as a ClientApp runs (``EditWorker.handle``), without Flower: what the fast
tests and the reproduction benchmark use. Every instruction and reply is kept in ``log`` when asked.
``secure_sum`` adds what the clients return, so the server learns the sums only, as with SecAgg+
(without its masking and quantisation); the sums it learnt are kept in ``sums`` when asked.
"""

from __future__ import annotations

from fededit_core.client.worker import ClientSpec, EditWorker
from strategies.session import Instruction, Reply, SecureSum


class InProcessTransport:
    def __init__(self, specs: dict[str, ClientSpec], worker: EditWorker | None = None, keep_log: bool = True):
        self.specs, self.worker, self.keep_log = specs, worker or EditWorker(), keep_log
        self.log: list[tuple[str, Instruction, Reply]] = []
        self.sums: list[tuple[dict, dict]] = []  # (the instruction's arguments, the sums) per secure sum

    def __call__(self, instructions: dict[str, Instruction]) -> dict[str, Reply]:
        return self._deliver(instructions, log=self.keep_log)

    def _deliver(self, instructions: dict[str, Instruction], log: bool) -> dict[str, Reply]:
        replies = {}
        for client, ins in instructions.items():
            try:
                body, arrays = self.worker.handle(ins.op, self.specs[client], ins.args, ins.arrays)
                replies[client] = Reply(client, body, arrays)
            except Exception as err:  # noqa: BLE001 - as the ClientApp does: the failure goes back as the reply
                replies[client] = Reply(client, error=f"{type(err).__name__}: {err}")
            if log:
                self.log.append((client, ins, replies[client]))
        return replies

    def secure_sum(self, instructions: dict[str, Instruction], names: tuple[str, ...]) -> SecureSum:
        replies = self._deliver(instructions, log=False)
        ok = {c: r for c, r in replies.items() if not r.error and all(n in r.arrays for n in names)}
        sums = {n: sum(r.arrays[n] for r in ok.values()) for n in names} if ok else {}
        if self.keep_log and ok:
            self.sums.append((dict(next(iter(instructions.values())).args), sums))
        errors = {c: r.error or "no arrays" for c, r in replies.items() if c not in ok}
        return SecureSum(sums, list(ok), errors)
