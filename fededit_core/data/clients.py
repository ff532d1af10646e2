"""Names of simulated clients: ``client-0`` .. ``client-{n-1}``, the names partitions and records use."""


def client_name(index: int) -> str:
    return f"client-{index}"
